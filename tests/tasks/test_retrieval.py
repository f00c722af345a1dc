"""Retrieval and pretraining: the contrastive loss, DDP equivalence, hard negatives, masking,
ranking, --init, and tiny train -> eval -> predict runs."""

import datetime
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from mmt import checkpoint, registry
from mmt.cli import main
from mmt.data.images import to_pixels
from mmt.data.worlds import shapes
from mmt.models.retrieval import LossWeights, RetrievalModel, contrastive_loss, sample_hard_negatives
from mmt.models.vqa import VQAModel
from mmt.tasks.retrieval import ranks_of, recall_at, rerank
from mmt.train import init_from
from tests.own_data import caption_lines, shapes_images


def test_contrastive_loss_matches_a_hand_computed_value():
    # two unit vectors per side at 90 degrees; scale 2
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # image->text logits: row 0: [1.2, 0.0], row 1: [1.6, 2.0]; text->image: row 0: [1.2, 1.6], row 1: [0.0, 2.0]
    ce = lambda logits, right: -logits[right] + math.log(sum(math.exp(v) for v in logits))  # noqa: E731
    i2t = (ce([1.2, 0.0], 0) + ce([1.6, 2.0], 1)) / 2
    t2i = (ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1)) / 2
    expected = (i2t + t2i) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_loss_counts_every_caption_of_an_image_as_positive():
    image = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    scale = torch.tensor(5.0)
    ids = torch.tensor([7, 7, 9])  # rows 0 and 1 show the same image
    i2t = scale * image @ text.T
    t2i = i2t.T
    pos = (ids[:, None] == ids[None]).float()
    target = pos / pos.sum(1, keepdim=True)
    expected = 0.5 * (-(target * i2t.log_softmax(1)).sum(1).mean() - (target * t2i.log_softmax(1)).sum(1).mean())
    assert contrastive_loss(image, text, scale, ids).item() == pytest.approx(expected.item(), abs=1e-6)
    assert contrastive_loss(image, text, scale, ids).item() != pytest.approx(contrastive_loss(image, text, scale).item(), abs=1e-4)


# ----------------------------------------------------------------------------- DDP


def _tiny_itc_model() -> RetrievalModel:
    cfg = registry.preset("retrieval-tiny")
    cfg.losses = LossWeights(itc=1.0, itm=0.0)  # ITM draws negatives at random: not comparable across layouts
    cfg.text.vocab_size = 30
    torch.manual_seed(0)
    return RetrievalModel(cfg)  # GroupNorm stem: each sample independent of its batch


def _ddp_batch():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    ids = torch.randint(7, 30, (8, 6), generator=g)
    ids[:, 0] = 2  # [CLS]
    ids[5, 4:] = 0  # some padding
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2])  # image 2 twice: soft targets across ranks
    return pixels, ids, image_ids


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file in the test's own directory, not a port: nothing else can take it between
    # choosing and binding it
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        _ddp_step(rank, world, out_dir)  # its DDP model, which holds the group, is gone on return
        dist.barrier()  # both processes are done with every collective before either tears the group down
    finally:
        dist.destroy_process_group()


def _ddp_step(rank: int, world: int, out_dir: str) -> None:
    """One DDP forward/backward over this process's half of the batch; saves its loss and gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_tiny_itc_model())
    pixels, ids, image_ids = _ddp_batch()
    half = slice(rank * 4, rank * 4 + 4)
    loss = model(pixels[half], ids[half], image_ids[half])["itc_loss"]
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
    torch.save({"loss": total / world, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.multiprocess
def test_two_process_ddp_matches_one_process_on_the_whole_batch(tmp_path):
    context = mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = 120  # a broken process group fails the test instead of hanging it
    while not context.join(timeout=deadline):
        deadline = 0
        if not all(p.is_alive() for p in context.processes):
            continue
        for p in context.processes:
            p.kill()
        pytest.fail("the 2-process gloo run did not finish in 120 s")
    model = _tiny_itc_model()
    pixels, ids, image_ids = _ddp_batch()
    loss = model(pixels, ids, image_ids)["itc_loss"]
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for r in ranks:  # DDP leaves every rank with the same, averaged gradient
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked > 20 and model.logit_scale.grad is not None


# ----------------------------------------------------------------------------- hard negatives, masking


def test_hard_negatives_never_pick_a_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    similarity = torch.randn(6, 6, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    positive = ids[:, None] == ids[None]
    similarity[positive] = 50.0  # the most similar columns are the positives: must still never be drawn
    for _ in range(200):
        picks = sample_hard_negatives(similarity, positive, generator=g)
        assert not positive[torch.arange(6), picks].any()
    # a much more similar negative is drawn far more often than the rest
    similarity = torch.zeros(1, 4)
    similarity[0, 2] = 5.0
    picks = torch.stack([sample_hard_negatives(similarity, torch.tensor([[True, False, False, False]]), generator=g) for _ in range(300)])
    assert (picks == 2).float().mean() > 0.9
    with pytest.raises(ValueError, match="row 0"):
        sample_hard_negatives(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))


def test_masking_leaves_special_tokens_and_masks_every_caption():
    model = _tiny_itc_model()
    model.config.losses.mlm = 1.0
    ids = torch.randint(7, 30, (64, 10))
    ids[:, 0], ids[:, 9] = 2, 3
    ids[::2, 6:] = 0
    masked, targets = model.mask_tokens(ids)
    special = torch.isin(ids, torch.tensor(model.config.special_ids))
    assert (targets[special] == -100).all() and torch.equal(masked[special], ids[special])
    chosen = targets != -100
    assert chosen.any(1).all()  # every caption has something to predict
    assert torch.equal(targets[chosen], ids[chosen])
    assert 0.1 < chosen.sum() / (~special).sum() < 0.25  # about 15%
    assert (masked[chosen] == model.config.mask_id).float().mean() > 0.6


# ----------------------------------------------------------------------------- ranking


def test_ranks_recall_and_rerank():
    similarity = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8]])  # 2 queries, 3 candidates
    positive = torch.tensor([[False, True, False], [False, False, True]])
    ranks = ranks_of(similarity, positive)
    assert ranks.tolist() == [1, 0]
    assert recall_at(ranks, (1, 2)) == {"R@1": 0.5, "R@2": 1.0}
    # matching scores prefer candidate 1 for query 0: re-ranking its top-2 puts it first
    candidates = similarity.topk(2, dim=1).indices
    scores = torch.tensor([[-1.0, 3.0], [2.0, 1.0]])  # per candidate, in top-k order
    reranked = rerank(similarity, candidates, scores)
    assert ranks_of(reranked, positive).tolist() == [0, 0]
    assert reranked[0].argsort(descending=True).tolist() == [1, 0, 2]  # the rest stays below the top-k
    # a tie with a negative counts against the positive: a collapsed model scores nothing
    assert ranks_of(torch.zeros(2, 3), positive).tolist() == [2, 2]


def test_matching_without_the_contrastive_term_is_refused():
    cfg = registry.preset("retrieval-tiny")
    cfg.losses = LossWeights(itc=0.0, itm=1.0)
    with pytest.raises(ValueError, match="losses.itm needs losses.itc"):
        RetrievalModel(cfg)


# ----------------------------------------------------------------------------- --init


def test_init_loads_matching_weights_and_reports_the_rest(tmp_path):
    pretrain = registry.preset("pretrain-small")
    pretrain.text.vocab_size = 50
    source = RetrievalModel(pretrain)
    checkpoint.save_pretrained(source, tmp_path / "src")
    vqa = registry.preset("vqa-small")
    vqa.vision.image_size = 64
    vqa.vision.encoder.depth = 2
    vqa.text.encoder.depth = 2
    vqa.text.vocab_size = 50
    vqa.text.max_len = 24  # the source has 48 positions: skipped, not cut
    target = VQAModel(vqa)
    report = init_from(target, tmp_path / "src")
    assert "vision.stem.body.0.weight" in report.loaded and "fusion.layers.0.cross_attn.q_proj.weight" in report.loaded
    torch.testing.assert_close(target.state_dict()["vision.stem.body.0.weight"], source.state_dict()["vision.stem.body.0.weight"])
    torch.testing.assert_close(target.fusion.layers[1].ffn.fc1.weight, source.fusion.layers[1].ffn.fc1.weight)
    assert all(k.startswith("head.") for k in report.missing) and report.missing
    assert [k for k, _, _ in report.mismatched] == ["text.embed.positions.table"]
    assert "itm_head.weight" in report.unexpected and "lm_head.weight" in report.unexpected
    text = report.describe_init(tmp_path / "src")
    assert "loaded" in text and "text.embed.positions.table [48, 128] -> [24, 128]" in text


# ----------------------------------------------------------------------------- end to end

TINY = [
    "data.image_size=32", "data.num_train=64", "data.num_val=8", "data.num_test=8", "train.steps=6",
    "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=3", "train.save_every=3", "train.log_every=1",
]


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["train", "pretrain", str(directory), "--preset", "retrieval-tiny", "--no-progress", *sets(TINY)]) == 0
    return directory


@pytest.mark.e2e
def test_pretrain_logs_each_loss_and_evaluates_recall(pretrain_run, capsys):
    records = [json.loads(line) for line in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for key in ("itc_loss", "itm_loss", "mlm_loss", "lm_loss"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    assert steps[0]["loss"] == pytest.approx(sum(steps[0][k] for k in ("itc_loss", "itm_loss", "mlm_loss", "lm_loss")), rel=1e-5)
    evals = [r["eval"] for r in records if "eval" in r]
    assert {"t2i_R@1", "t2i_R@10", "i2t_R@5", "t2i_R@1_rerank", "i2t_R@10_rerank"} <= set(evals[-1])
    assert main(["eval", str(pretrain_run)]) == 0
    out = capsys.readouterr().out
    assert "text -> image contrastive" in out and "+ ITM re-rank" in out
    result = json.loads((pretrain_run / "eval.json").read_text())
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert result["t2i_R@10"] >= result["t2i_R@5"] >= result["t2i_R@1"]


@pytest.mark.e2e
def test_rerank_adds_the_contrastive_logit_to_the_matching_log_odds(pretrain_run, monkeypatch):
    import mmt.tasks.retrieval as retrieval

    model, tokenizer = retrieval.load_for_inference(pretrain_run)
    split = shapes.ShapesSplit.generate(12, seed=5, image_size=32)
    pixels = to_pixels(split.images)
    captions = [c[:2] for c in split.captions]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    k = 5
    with torch.no_grad():
        texts = [c for caps in captions for c in caps]
        t2i = retrieval.encode_texts(model, tokenizer, texts)[0] @ retrieval.encode_images(model, pixels)[0].T
    last = t2i.topk(k, dim=1).indices[:, -1]  # each caption's k-th contrastive candidate

    def scores_with(itm, adds_contrastive):
        monkeypatch.setattr(retrieval, "match_scores", lambda model, texts, pads, images, pairs: itm(pairs))
        model.config.rerank_adds_contrastive = adds_contrastive
        return retrieval.retrieval_scores(model, tokenizer, pixels, captions, rerank_k=k)

    # log-odds rising along each query's k candidates (pairs come query by query, best first)
    def ramp(size):
        return lambda pairs: size * (torch.arange(len(pairs)) % k).float()

    # ITM alone follows the ramp: the k-th contrastive candidate goes first
    alone = scores_with(ramp(1.0), False)
    assert alone["t2i_R@1_rerank"] == pytest.approx((owner == last).float().mean().item())
    # added to the contrastive logit, a tiny ramp changes nothing and a steep one wins
    assert scores_with(ramp(1e-6), True)["t2i_R@1_rerank"] == pytest.approx(alone["t2i_R@1"])
    assert scores_with(ramp(1e4), True)["t2i_R@1_rerank"] == pytest.approx(alone["t2i_R@1_rerank"])
    # log-odds that single out the right pair by far put it first either way
    for adds_contrastive in (True, False):
        oracle = scores_with(lambda pairs: 1e4 * (owner[pairs[:, 0]] == pairs[:, 1]).float(), adds_contrastive)
        assert oracle["t2i_R@1_rerank"] == oracle["t2i_R@5"] and oracle["i2t_R@1_rerank"] == oracle["i2t_R@5"]


@pytest.mark.e2e
def test_eval_set_switches_the_rerank_score(pretrain_run, tmp_path, monkeypatch):
    import mmt.tasks.retrieval as retrieval

    seen, original = [], retrieval.retrieval_scores

    def spy(model, *args, **kwargs):
        seen.append(model.config.rerank_adds_contrastive)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(retrieval, "retrieval_scores", spy)
    assert main(["eval", str(pretrain_run), "--out", str(tmp_path / "a.json")]) == 0
    assert main(["eval", str(pretrain_run), "--out", str(tmp_path / "b.json"), "--set", "model.rerank_adds_contrastive=false"]) == 0
    assert seen == [True, False]


def test_switched_off_terms_have_no_module_and_no_loss():
    cfg = registry.preset("retrieval-tiny")
    cfg.losses = LossWeights(itc=1.0, itm=0.0, mlm=0.0, lm=0.0)
    cfg.text.vocab_size = 30
    model = RetrievalModel(cfg)
    assert not any(hasattr(model, name) for name in ("fusion", "itm_head", "mlm_head", "decoder"))
    pixels, ids, image_ids = _ddp_batch()
    assert set(k for k in model(pixels, ids, image_ids) if k.endswith("_loss")) == {"itc_loss"}


@pytest.mark.e2e
def test_init_from_pretraining_into_retrieval_and_zero_shot_predict(pretrain_run, tmp_path, capsys):
    run = tmp_path / "ret"
    args = ["train", "retrieval", str(run), "--preset", "retrieval-tiny", "--init", str(pretrain_run), "--no-progress"]
    assert main(args + sets([*TINY[:-5], "train.steps=2", "train.eval_every=2", "model.losses.mlm=0", "model.losses.lm=0"])) == 0
    out = capsys.readouterr().out
    assert f"init from {pretrain_run}" in out
    report = json.loads((run / "init_report.json").read_text())
    assert not report["new"] and not report["skipped_shape_mismatch"]  # same towers and heads
    assert any(k.startswith("decoder.") for k in report["unused"]) and any(k.startswith("mlm_head.") for k in report["unused"])
    # the run uses the pretraining run's tokenizer: the weights mean nothing under other ids
    assert (run / "tokenizer.json").read_text() == (pretrain_run / "tokenizer.json").read_text()

    image = tmp_path / "scene.png"
    Image.fromarray(shapes.ShapesSplit.generate(1, seed=3, image_size=32).images[0]).save(image)
    assert main(["predict", str(run), "--image", str(image), "--labels", "red,green,blue", "--template", "a {} object", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["label"] in {"red", "green", "blue"}
    assert sum(item["score"] for item in result["labels"]) == pytest.approx(1.0, abs=1e-3)
    assert main(["predict", str(run), "--image", str(image)]) == 2  # a retrieval run needs labels
    assert "--labels" in capsys.readouterr().err


@pytest.mark.e2e
def test_init_needs_a_model_directory(tmp_path, capsys):
    args = ["train", "retrieval", str(tmp_path / "r"), "--init", str(tmp_path / "nowhere"), "--no-progress"]
    assert main(args) == 2
    assert "nowhere" in capsys.readouterr().err


def test_matching_needs_two_different_images_in_a_batch():
    cfg = registry.preset("retrieval-tiny")
    cfg.text.vocab_size = 30
    model = RetrievalModel(cfg)
    pixels, ids, _ = _ddp_batch()
    with pytest.raises(ValueError, match="at least 2 different images"):
        model(pixels[:2], ids[:2], torch.tensor([4, 4]))


@pytest.mark.e2e
def test_retrieval_trains_and_evaluates_on_your_own_json_lines(tmp_path, capsys):
    lines = [line for image in caption_lines(shapes_images(tmp_path, 30, seed=9)) for line in image]  # 1-3 captions each
    lines.append(json.dumps({"image": "img/missing.png", "text": "a red circle"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[:12]) + "\n")
    run = tmp_path / "run"
    args = ["train", "retrieval", str(run), "--preset", "retrieval-tiny", "--no-progress", "--set", f"source.train={tmp_path / 'pairs.jsonl'}"]
    steps = sets(["train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=2", "train.save_every=2"])
    assert main(args + steps) == 2  # the missing image stops the run before training, named
    assert "missing.png" in capsys.readouterr().err
    assert main(args + steps + ["--set", "source.skip_bad=true"]) == 0
    report = json.loads((run / "data_report.json").read_text())
    assert report == {"train_images": 27, "val_images": 3, "skipped_train": {"missing_image": 1}, "skipped_val": {}}
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "data": report}  # the skipped count is in the training log too
    assert main(["eval", str(run)]) == 2  # a held-out tail cannot be rebuilt: ask for a test file
    assert "source.test" in capsys.readouterr().err
    assert main(["eval", str(run), "--set", f"source.test={tmp_path / 'test.jsonl'}"]) == 0
    out = capsys.readouterr().out
    assert "test images" in out and "text -> image contrastive" in out
