"""Caption metrics as the COCO caption server reports them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

Every number comes from pycocoevalcap (https://github.com/salaniz/pycocoevalcap), the Python 3
package of the COCO caption evaluation code (Chen et al. 2015, "Microsoft COCO Captions",
arXiv:1504.00325). This module only checks and tokenizes the captions, calls its scorers and
collects their results; it reimplements no metric.

- BLEU-n (Papineni et al. 2002): corpus level. Clipped n-gram counts are summed over all images
  and the brevity penalty compares the total length with the closest reference lengths.
- METEOR (Denkowski & Lavie 2014): the METEOR 1.5 jar, run as a `java` subprocess; corpus level.
  Loading its paraphrase table takes about 8 s.
- ROUGE-L (Lin 2004): the mean over images of the longest-common-subsequence F-score (beta = 1.2)
  against the best-matching reference.
- CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation", CVPR,
  arXiv:1411.5726): for n = 1..4, the cosine similarity between the caption's TF-IDF-weighted
  n-gram vector and each reference's, averaged over references and n, times 10. The "-D"
  variant, the one the COCO server reports as "CIDEr", clips the caption's n-gram weights at the
  reference's and multiplies by a Gaussian penalty on the length difference (sigma = 6), so a
  caption gains nothing by repeating or padding. The IDF is computed from the references of the
  images being scored. So the score depends on the whole set. A single image always scores 0,
  and scores on a few images are not comparable with published ones.

Tokenization: the COCO server lowercases and tokenizes every caption with Stanford CoreNLP's
PTBTokenizer (a jar bundled with pycocoevalcap), then drops punctuation tokens. tokenize="ptb"
does exactly that, which gives numbers comparable with papers. Without Java, tokenize="simple"
(`simple_tokenize`) approximates it in Python.

Files use the COCO formats: results are `[{"image_id": 1, "caption": "..."}, ...]`, references
are `{"images": [...], "annotations": [{"image_id": 1, "id": 7, "caption": "..."}, ...]}`.
"""

import contextlib
import io
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mmt.extras import require
from mmt.files import atomic_write_text

if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor

# pycocoevalcap is imported where captions are scored, not here: training, prediction and
# VQA scoring import this module (for its file readers) and need none of it.

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
TOKENIZERS = ("ptb", "simple")
_SHOWN_IDS = 5  # how many offending image ids an error message lists


def _preview(ids: list) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    more = f", ... ({len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else ""
    return f"[{shown}{more}]"


def _check_results(results: dict) -> None:
    if not results:
        raise ValueError("no captions to score: results is empty")
    for image_id, caption in results.items():
        if not isinstance(caption, str):
            raise ValueError(f"results[{image_id!r}] must be one caption string, got {type(caption).__name__}")


def _check_references(references: dict) -> None:
    for image_id, captions in references.items():
        if not isinstance(captions, (list, tuple)) or not captions:
            raise ValueError(f"references[{image_id!r}] must be a non-empty list of caption strings, got {captions!r:.80}")
        for caption in captions:
            if not isinstance(caption, str):
                raise ValueError(f"references[{image_id!r}] holds a {type(caption).__name__}, not a caption string")


def _check_same_images(results: dict, references: dict, results_name: str = "results", references_name: str = "references") -> None:
    unreferenced = [i for i in results if i not in references]
    if unreferenced:
        raise ValueError(
            f"{len(unreferenced)} image id(s) in {results_name} have no references in {references_name}: {_preview(unreferenced)}"
        )
    uncaptioned = [i for i in references if i not in results]
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} image id(s) in {references_name} have no caption in {results_name}: {_preview(uncaptioned)}; "
            "caption every image, or drop the missing ones from the references"
        )


def _check_json_id(image_id: Hashable, where: str) -> None:
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        kind = type(image_id).__name__
        raise ValueError(f"{where}: image id {image_id!r} has type {kind}; COCO files need int or str (convert with int())")


# A word is a run of letters/digits; an apostrophe inside a word starts a new token ("man's" -> "man 's"), as in PTB.
_SIMPLE_TOKEN = re.compile(r"(?<=[^\W_])'[^\W_]+|[^\W_]+")


def simple_tokenize(caption: str) -> str:
    """Lowercase and split into words, dropping punctuation: "A man's hat, on-the-table!" -> "a man 's hat on the table".

    A Java-free stand-in for the PTB tokenizer. It agrees on plain words and "'s", but differs
    elsewhere (PTB keeps "3.5" and splits "don't" as "do n't"), so scores can differ slightly from
    the COCO server's.
    """
    return " ".join(_SIMPLE_TOKEN.findall(caption.lower().replace("\u2019", "'")))


def ptb_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer: the same jar, flags and punctuation list, one caption per line.

    The upstream class writes a temporary file into its own site-packages folder, which fails on a
    read-only install, and lets Java print to the terminal. This version pipes the captions through
    stdin, captures Java's output and checks that it gets one line back per caption.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    # A line break inside a caption ("\r", "\u2028", ...) would shift every caption after it.
    lines = [" ".join(caption.split()) for caption in captions]
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    proc = subprocess.run(cmd, input="".join(line + "\n" for line in lines), capture_output=True, encoding="utf-8")
    tokenized = proc.stdout.split("\n")[:-1]
    if proc.returncode != 0 or len(tokenized) != len(lines):
        raise RuntimeError(
            f"the PTB tokenizer ({' '.join(cmd)}) exited with {proc.returncode} and returned {len(tokenized)} lines "
            f"for {len(lines)} captions; java said: {proc.stderr.strip()[-500:] or '(nothing)'}"
        )
    return [" ".join(word for word in line.split() if word not in ptbtokenizer.PUNCTUATIONS) for line in tokenized]


@contextlib.contextmanager
def _meteor_scorer() -> Iterator["Meteor"]:
    """pycocoevalcap's Meteor, with its java process stopped on exit, also when scoring fails.

    Meteor stops its process only in __del__, which first takes the lock that compute_score holds
    while it talks to java. If compute_score raised, that lock stays taken, and __del__ would then
    block forever when the object is collected. So stop the process here and give __del__ a fresh
    lock; its own kill and wait then do nothing.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        process = scorer.meteor_p
        process.kill()
        process.wait()
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        process.stdout.close()
        process.stderr.close()
        scorer.lock = threading.Lock()


def _meteor(references: dict[Hashable, list[str]], results: dict[Hashable, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import METEOR_JAR

    with _meteor_scorer() as scorer:
        try:
            score, _ = scorer.compute_score(references, results)
        except Exception as e:
            scorer.meteor_p.kill()
            java_said = scorer.meteor_p.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"METEOR ({METEOR_JAR}) failed: {e!r}; java said: {java_said[-500:] or '(nothing)'}") from e
    return float(score)


def score_captions(
    results: dict[Hashable, str],
    references: dict[Hashable, list[str]],
    meteor: bool | None = None,
    tokenize: str | None = None,
) -> dict[str, float | str]:
    """Score one generated caption per image against that image's reference captions.

    Args:
        results: image id -> generated caption.
        references: image id -> reference captions (at least one). Both must cover the same images.
        meteor: compute METEOR (needs Java; adds ~8 s of startup). None: when `java` is on PATH.
        tokenize: "ptb" (Stanford PTBTokenizer, needs Java; what the COCO server does) or
            "simple" (`simple_tokenize`). None: "ptb" when `java` is on PATH, else "simple".

    Returns:
        {"BLEU-1": ..., "BLEU-4": ..., ["METEOR": ...,] "ROUGE-L": ..., "CIDEr-D": ..., "tokenizer": "ptb"|"simple"}.
        The scores are floats, in [0, 1] except CIDEr-D (0 to 10). "tokenizer" is a string and says
        which tokenizer was used.
    """
    _check_results(results)
    _check_references(references)
    _check_same_images(results, references)
    require("pycocoevalcap", "scoring captions")
    java = shutil.which("java") is not None
    tokenize = tokenize or ("ptb" if java else "simple")
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize={tokenize!r}; choose one of {TOKENIZERS}")
    meteor = java if meteor is None else meteor
    if not java and (meteor or tokenize == "ptb"):
        needs = "METEOR" if meteor else "the PTB tokenizer"
        raise RuntimeError(
            f"{needs} runs a Java program, but no `java` is on PATH; install a JRE, or pass meteor=False, tokenize='simple'"
        )

    image_ids = list(results)
    captions = [results[i] for i in image_ids] + [ref for i in image_ids for ref in references[i]]
    tokenized = iter(ptb_tokenize(captions) if tokenize == "ptb" else [simple_tokenize(c) for c in captions])
    res = {i: [next(tokenized)] for i in image_ids}
    gts = {i: [next(tokenized) for _ in references[i]] for i in image_ids}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints progress and n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        meteor_score = _meteor(gts, res) if meteor else None

    scores: dict[str, float | str] = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor_score is not None:
        scores["METEOR"] = meteor_score
    scores["ROUGE-L"] = float(rouge)
    scores["CIDEr-D"] = float(cider)
    scores["tokenizer"] = tokenize
    return scores


_RECORD = '{"image_id": ..., "caption": ...}'


def read_json(path: Path):
    """The parsed JSON file; invalid JSON or bad UTF-8 raises ValueError naming the file (and line/column)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _caption_record(path: Path, where: str, record) -> tuple[int | str, str]:
    """(image_id, caption) of one {"image_id": ..., "caption": ...} record; errors name file and index."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where}: expected an object with 'image_id' and 'caption', got {type(record).__name__}")
    for key in ("image_id", "caption"):
        if key not in record:
            raise ValueError(f"{path}: {where}: missing key {key!r}")
    image_id, caption = record["image_id"], record["caption"]
    _check_json_id(image_id, f"{path}: {where}")
    if not isinstance(caption, str):
        raise ValueError(f"{path}: {where}: 'caption' must be a string, got {type(caption).__name__}")
    return image_id, caption


def load_coco_results(path: str | Path) -> dict[int | str, str]:
    """Read COCO results, `[{"image_id": ..., "caption": ...}, ...]`, one caption per image."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {_RECORD} records (COCO results format)")
    results: dict[int | str, str] = {}
    first_index: dict[int | str, int] = {}
    for index, record in enumerate(data):
        image_id, caption = _caption_record(path, f"[{index}]", record)
        if image_id in first_index:
            first = first_index[image_id]
            raise ValueError(f"{path}: [{index}]: duplicate image_id {image_id!r} (first at [{first}]); give one caption per image")
        first_index[image_id] = index
        results[image_id] = caption
    return results


def load_coco_references(path: str | Path) -> dict[int | str, list[str]]:
    """Read COCO captions, `{"images": [...], "annotations": [{"image_id", "caption"}, ...]}`, or a bare annotation list.

    "images" is not needed and not read; an image's references are its annotations, in file order.
    """
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict):
        if "annotations" not in data:
            raise ValueError(f"{path}: missing key 'annotations' (COCO captions format: {{\"annotations\": [{_RECORD}, ...]}})")
        annotations, prefix = data["annotations"], "annotations"
    else:
        annotations, prefix = data, ""
    if not isinstance(annotations, list) or not annotations:
        raise ValueError(f"{path}: {prefix or 'the file'} must be a non-empty list of {_RECORD} records")
    references: dict[int | str, list[str]] = {}
    for index, record in enumerate(annotations):
        image_id, caption = _caption_record(path, f"{prefix}[{index}]", record)
        references.setdefault(image_id, []).append(caption)
    return references


def score_files(results_path: str | Path, references_path: str | Path, **kwargs) -> dict[str, float | str]:
    """`score_captions` on a COCO results file and a COCO captions file; kwargs go to it."""
    results = load_coco_results(results_path)
    references = load_coco_references(references_path)
    _check_same_images(results, references, str(results_path), str(references_path))
    return score_captions(results, references, **kwargs)


def format_scores(scores: dict[str, float | str]) -> str:
    """A two-column text table of the scores, then the tokenizer used."""
    lines = [f"{'metric':<8}  score"]
    lines += [f"{name:<8}  {value:.4f}" for name, value in scores.items() if isinstance(value, float)]
    if "tokenizer" in scores:
        lines.append(f"(tokenizer: {scores['tokenizer']})")
    return "\n".join(lines)


def _write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def write_coco_results(path: str | Path, results: dict[int | str, str]) -> None:
    """Write image id -> caption as a COCO results file (atomically)."""
    _check_results(results)
    for image_id in results:
        _check_json_id(image_id, str(path))
    records = [{"image_id": image_id, "caption": caption} for image_id, caption in results.items()]
    _write_json(path, records)


def write_coco_references(path: str | Path, references: dict[int | str, list[str]]) -> None:
    """Write image id -> reference captions as a COCO captions file (atomically); annotation ids count from 0."""
    _check_references(references)
    for image_id in references:
        _check_json_id(image_id, str(path))
    pairs = [(image_id, caption) for image_id, captions in references.items() for caption in captions]
    data = {
        "images": [{"id": image_id} for image_id in references],
        "annotations": [{"image_id": image_id, "id": n, "caption": caption} for n, (image_id, caption) in enumerate(pairs)],
    }
    _write_json(path, data)
