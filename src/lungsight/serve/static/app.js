// The upload page: send the study, follow the job, show what the API returns. Plain JS, no build step, no CDN.
// Every API call carries the token when one is given, so images and the report are fetched and shown as blob: URLs.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
let blobs = [];
let dropped = null;

function headers() {
  const token = $("token").value.trim();
  sessionStorage.setItem("lungsight-token", token);
  return token ? { Authorization: "Bearer " + token } : {};
}

function show(id, visible) { $(id).hidden = !visible; }

function fail(message) {
  $("error").textContent = message;
  show("error", true);
  show("progress", false);
  $("submit").disabled = false;
}

function stage(text, percent) {
  $("stage").textContent = text;
  if (percent === null) $("bar").removeAttribute("value"); else $("bar").value = percent;
}

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; } catch { return response.statusText; }
}

async function getJSON(url) {
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) throw new Error(await detail(r));
  return r.json();
}

async function blobURL(url) {
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) return null;
  const u = URL.createObjectURL(await r.blob());
  blobs.push(u);
  return u;
}

function upload(files) {
  const form = new FormData();
  for (const f of files) form.append("file", f);
  if ($("modality").value) form.append("modality", $("modality").value);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", API + "/studies");
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) stage("Uploading " + Math.round((100 * e.loaded) / e.total) + " %", (100 * e.loaded) / e.total);
    };
    xhr.upload.onload = () => stage("Reading and de-identifying the study", null);
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { body = { detail: xhr.statusText }; }
      if (xhr.status === 202 || xhr.status === 200) resolve(body);
      else reject(new Error(body.detail || "HTTP " + xhr.status));
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error or the server closed the connection)"));
    xhr.send(form);
  });
}

async function follow(job) {
  for (;;) {
    if (job.status === "done") return job;
    if (job.status === "failed") throw new Error(job.error || "the study could not be analysed");
    stage(job.status === "queued" ? "Waiting for a free worker" : "Analysing", null);
    await new Promise((r) => setTimeout(r, 300));
    job = await getJSON(API + "/studies/" + job.id);
  }
}

function row(table, cells) {
  const tr = table.insertRow();
  for (const c of cells) {
    const td = tr.insertCell();
    if (c instanceof Node) { td.className = "bar"; td.appendChild(c); } else td.textContent = c;
  }
}

async function render(id, result) {
  const base = API + "/studies/" + id;
  const d = result.decision;
  $("decision").textContent = d.label;
  $("decision-box").className = "decision " + (d.positive ? "pos" : "neg");
  $("decision-detail").textContent =
    "rule " + d.rule + ", score " + Number(d.score).toFixed(3) +
    (d.n_slices !== undefined ? ", " + d.n_positive + " of " + d.n_slices + " classified slices positive" : "");

  const table = $("probabilities");
  table.replaceChildren();
  for (const [cls, p] of Object.entries(result.probabilities)) {
    const bar = document.createElement("span");
    bar.style.width = Math.round(200 * p) + "px";
    row(table, [cls, Number(p).toFixed(3), bar]);
  }

  const ev = result.evidence;
  $("lung-share").textContent = ev && typeof ev.lung_share === "number"
    ? Math.round(100 * ev.lung_share) + " % of the Grad-CAM evidence lies inside the lungs" +
      (ev.flagged ? " - FLAGGED: most evidence lies outside the lungs, treat this answer as unreliable" : "")
    : "Not measured for this modality (" + result.input.modality + ").";

  const list = $("warnings").querySelector("ul");
  list.replaceChildren();
  for (const w of result.warnings || []) {
    const li = document.createElement("li");
    li.textContent = w;
    list.appendChild(li);
  }
  show("warnings", (result.warnings || []).length > 0);

  const plot = await blobURL(base + "/plot");
  $("plot").hidden = !plot;
  if (plot) $("plot").src = plot;

  const grid = $("overlays");
  grid.replaceChildren();
  for (const o of result.overlays || []) {
    const url = await blobURL(base + "/overlays/" + o.file.split("/").pop());
    if (!url) continue;
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "Grad-CAM overlay of " + o.label;
    img.className = "overlay";
    const cap = document.createElement("figcaption");
    cap.textContent = o.label + " - p = " + Number(o.p).toFixed(3);
    fig.append(img, cap);
    grid.appendChild(fig);
  }

  const report = await blobURL(base + "/report");
  $("report").href = report;
  $("report-download").href = report;
  const json = URL.createObjectURL(new Blob([JSON.stringify(result, null, 2)], { type: "application/json" }));
  blobs.push(json);
  $("json-download").href = json;
  show("result", true);
}

async function analyse(event) {
  event.preventDefault();
  const files = dropped || $("file").files;
  if (!files || files.length === 0) { fail("Choose or drop a study first."); return; }
  for (const u of blobs) URL.revokeObjectURL(u);
  blobs = [];
  show("error", false);
  show("result", false);
  show("progress", true);
  $("submit").disabled = true;
  try {
    const job = await follow(await upload(files));
    stage("Fetching the result", 100);
    await render(job.id, await getJSON(API + "/studies/" + job.id + "/result"));
    show("progress", false);
  } catch (e) {
    fail(e.message);
    return;
  }
  $("submit").disabled = false;
}

function chosen(files) {
  $("chosen").textContent = files.length ? files.length + " file(s) chosen" : "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem("lungsight-token") || "";
  $("upload-form").addEventListener("submit", analyse);
  $("file").addEventListener("change", () => { dropped = null; chosen($("file").files); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    dropped = e.dataTransfer.files;
    chosen(dropped);
  });
});
