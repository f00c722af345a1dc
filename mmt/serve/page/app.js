// The page of `mmt serve`: one image, then ask, caption or search; or draw from a text. Every call is one of the JSON API's.
"use strict";
const $ = (id) => document.getElementById(id);
let image = null; // the picked File
let models = { models: [], indexes: [] };

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function call(path, form) {
  const response = await fetch(path, { method: "POST", body: form });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function formWith(fields) {
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) if (value !== undefined && value !== null) form.append(key, value);
  return form;
}

function needImage() {
  if (!image) throw new Error("pick an image first");
  return image;
}

async function busy(button, work) {
  button.disabled = true;
  showError("");
  try { await work(); } catch (e) { showError(e.message); } finally { button.disabled = false; }
}

function scored(element, text, score) {
  element.textContent = text + " ";
  const small = document.createElement("span");
  small.className = "score";
  small.textContent = `(${Number(score).toFixed(3)})`;
  element.append(small);
}

async function heatMap(img, fields) {
  const response = await call("/v1/explain", formWith(fields));
  const blob = await response.blob();
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
}

function pick(file) {
  if (!file) return;
  image = file;
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = `${file.name} — drop or tap for another`;
}

function fill(select, names) {
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  select.hidden = names.length < 2;
}

async function start() {
  const response = await fetch("/v1/models");
  models = await response.json();
  const of = (task) => models.models.filter((m) => m.task === task).map((m) => m.name);
  $("served").textContent = "serving " + models.models.map((m) => `${m.name} (${m.task})`).join(", ")
    + (models.indexes.length ? "; indexes " + models.indexes.map((i) => `${i.name} (${i.size} images)`).join(", ") : "");
  fill($("vqa-model"), of("vqa"));
  fill($("caption-model"), of("caption"));
  fill($("index"), models.indexes.map((i) => i.name));
  fill($("t2i-model"), of("t2i"));
  $("image-section").hidden = of("vqa").length + of("caption").length + models.indexes.length === 0;
  $("vqa-section").hidden = of("vqa").length === 0;
  $("caption-section").hidden = of("caption").length === 0;
  $("search-section").hidden = models.indexes.length === 0;
  $("draw-section").hidden = of("t2i").length === 0;
}

$("file").addEventListener("change", (e) => pick(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });

$("ask").addEventListener("click", () => busy($("ask"), async () => {
  const fields = { image: needImage(), question: $("question").value, model: $("vqa-model").value };
  const result = await (await call("/v1/vqa", formWith(fields))).json();
  scored($("answer"), result.answer, result.score);
  await heatMap($("answer-heat"), fields);
}));
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") $("ask").click(); });

$("caption-button").addEventListener("click", () => busy($("caption-button"), async () => {
  const model = $("caption-model").value;
  const result = await (await call("/v1/caption", formWith({ image: needImage(), model, num_beams: $("beams").value }))).json();
  scored($("caption"), result.caption || "(empty caption)", result.score);
  await heatMap($("caption-heat"), { image: image, model });
}));

async function search(fields) {
  $("hits").replaceChildren();
  $("search-status").textContent = "searching…";
  const result = await (await call("/v1/search", formWith({ ...fields, index: $("index").value, k: 8 }))).json();
  $("search-status").textContent = `${result.hits.length} best matches in ${result.index}`;
  $("hits").replaceChildren(...result.hits.map((hit) => {
    const item = document.createElement("li");
    const thumb = document.createElement("img");
    thumb.src = hit.thumbnail;
    thumb.alt = hit.path;
    thumb.loading = "lazy";
    item.append(thumb, `${hit.rank}. ${hit.path.split("/").pop()} (${hit.score.toFixed(3)})`);
    return item;
  }));
}
$("search").addEventListener("click", () => busy($("search"), () => search({ text: $("search-text").value })));
$("search-text").addEventListener("keydown", (e) => { if (e.key === "Enter") $("search").click(); });
$("search-image").addEventListener("click", () => busy($("search-image"), () => search({ image: needImage() })));

$("draw").addEventListener("click", () => busy($("draw"), async () => {
  $("drawings").replaceChildren();
  $("draw-status").textContent = "drawing…";
  const seed = Math.floor(Math.random() * 2 ** 31); // a new drawing each time; the seed shown draws it again
  try {
    const fields = { text: $("draw-text").value, num: $("draw-num").value, seed, model: $("t2i-model").value };
    const result = await (await call("/v1/generate", formWith(fields))).json();
    $("draw-status").textContent = result.text + " ";
    const seedNote = document.createElement("span");
    seedNote.className = "score";
    seedNote.textContent = `(seed ${result.seed})`;
    $("draw-status").append(seedNote);
    $("drawings").replaceChildren(...result.images.map((url, i) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `${result.text}, image ${i + 1}`;
      return img;
    }));
  } catch (e) {
    $("draw-status").textContent = "";
    throw e;
  }
}));
$("draw-text").addEventListener("keydown", (e) => { if (e.key === "Enter") $("draw").click(); });

start().catch((e) => showError("cannot reach the server: " + e.message));
