// Matcher's field-testing page: send a photo to POST /v1/match, show the verdict, the ranked
// labels with their reference views, and save a confirmation or correction (POST /v1/feedback).
// Plain JavaScript against the HTTP/JSON API of the same server; nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "matcher.token";

const state = { photo: null, answer: null, labels: [], feedback: false, objectUrls: [] };

// What geometric verification found: how many keypoints of the photo one rotation, scale
// and shift maps onto a catalogue photo, against the count that verifies an item.
function geometry(answer) {
  if (answer.inliers === undefined || answer.minInliers === undefined) return "";
  const verified = answer.inliers >= answer.minInliers ? "verified" : "not verified";
  return `; ${answer.inliers} keypoints agree (${answer.minInliers} verify): ${verified}`;
}

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The server's error message, whatever went wrong; asks for the token when it is needed.
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401 || response.status === 403) {
    $("options").open = true;
    $("token").focus();
  }
  return new Error(message);
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  if (!response.ok) throw await failure(response);
  return response;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function freeObjectUrls() {
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.objectUrls.push(url);
  return url;
}

async function loadModel() {
  try {
    const info = await (await api("/v1/model")).json();
    state.labels = info.labels;
    const views = info.referenceViews ? `${info.referenceViews} reference views` : "no index";
    $("model").textContent =
      `${info.labels.length} items · ${info.backbone} v${info.model.modelVersion} · ${views}` +
      (info.engine ? ` · ${info.engine} ${info.precision}` : "");
    const select = $("correct-label");
    select.replaceChildren(...info.labels.map((label) => new Option(label, label)));
    state.feedback = (await (await api("/v1/feedback")).json()).enabled;
  } catch (error) {
    $("model").textContent = "The model is not available yet.";
    showError(error.message);
  }
}

function percent(value) {
  return `${(100 * value).toFixed(value >= 0.995 || value < 0.005 ? 0 : 1)} %`;
}

function renderVerdict(answer) {
  const verdict = $("verdict");
  const first = answer.matches[0];
  verdict.className = "verdict";
  if (answer.verdict === "NO_MATCH") {
    verdict.textContent = "No match";
    verdict.classList.add("no-match");
    $("verdict-detail").textContent =
      `Nothing in the catalogue is close enough: similarity ${answer.verdictScore.toFixed(3)} ` +
      `is below ${answer.threshold.toFixed(3)}${geometry(answer)}. ` +
      "The nearest items are listed for reference.";
  } else if (answer.verdict === "MATCH") {
    verdict.textContent = first.label;
    verdict.classList.add("match");
    $("verdict-detail").textContent =
      `Match: similarity ${answer.verdictScore.toFixed(3)} (threshold ${answer.threshold.toFixed(3)})` +
      geometry(answer);
  } else {
    verdict.textContent = first ? first.label : "";
    $("verdict-detail").textContent = "This classifier gives no verdict (it has no index).";
  }
}

async function referenceImage(img, referenceId) {
  const path = "/v1/references/" + referenceId.split("/").map(encodeURIComponent).join("/");
  try {
    img.src = objectUrl(await (await api(path)).blob());
  } catch (error) {
    img.alt = `reference not shown: ${error.message}`;
  }
}

function renderMatches(answer) {
  const list = $("matches");
  list.replaceChildren();
  for (const match of answer.matches) {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.alt = `reference view of ${match.label}`;
    img.className = "reference";
    const text = document.createElement("div");
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = match.label;
    const detail = document.createElement("div");
    detail.className = "quiet";
    const similarity = match.similarity === undefined ? "" : ` · similarity ${match.similarity.toFixed(3)}`;
    const inliers = match.inliers === undefined ? "" : ` · ${match.inliers} keypoints agree`;
    detail.textContent =
      `${percent(match.score)}${similarity}${inliers}` + (match.queryView ? ` · ${match.queryView}` : "");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(1, 100 * match.score)}%`;
    bar.append(fill);
    text.append(label, detail, bar);
    item.append(img, text);
    list.append(item);
    if (match.referenceId) referenceImage(img, match.referenceId);
  }
}

async function match(file) {
  showError("");
  freeObjectUrls();
  state.photo = file;
  $("photo").src = objectUrl(file);
  $("result").hidden = true;
  $("feedback-status").textContent = "";
  const form = new FormData();
  form.append("image", file, file.name || "photo.jpg");
  form.append("top_k", $("top-k").value || "5");
  if ($("views").value) form.append("views", $("views").value);
  $("elapsed").textContent = "Matching…";
  const started = performance.now();
  try {
    const answer = await (await api("/v1/match", { method: "POST", body: form })).json();
    const ms = performance.now() - started;
    state.answer = answer;
    renderVerdict(answer);
    renderMatches(answer);
    $("elapsed").textContent = `${Math.round(ms)} ms · views: ${answer.views.replace("VIEWS_", "").toLowerCase().replace("_", " + ")}`;
    const first = answer.matches[0];
    $("feedback").hidden = !(state.feedback && first);
    if (first) {
      // "No match" has nothing to confirm: the photo can only be named as one of the items.
      $("confirm").hidden = answer.verdict === "NO_MATCH";
      $("correct-prompt").textContent = answer.verdict === "NO_MATCH" ? "It is in fact" : "No, it is";
      $("confirm-label").textContent = first.label;
      $("correct-label").value = first.label;
    }
    $("result").hidden = false;
  } catch (error) {
    $("elapsed").textContent = "";
    showError(error.message);
  }
}

async function sendFeedback(label) {
  const form = new FormData();
  form.append("image", state.photo, state.photo.name || "photo.jpg");
  form.append("label", label);
  if (state.answer && state.answer.matches[0]) form.append("answer", state.answer.matches[0].label);
  if (state.answer) form.append("verdict", state.answer.verdict);
  try {
    const saved = await (await api("/v1/feedback", { method: "POST", body: form })).json();
    $("feedback-status").textContent = `Saved as a view of ${saved.label} (${saved.saved}).`;
  } catch (error) {
    $("feedback-status").textContent = `Not saved: ${error.message}`;
  }
}

function wire() {
  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    loadModel();
  });
  for (const id of ["camera-input", "file-input"]) {
    $(id).addEventListener("change", (event) => {
      const file = event.target.files[0];
      event.target.value = ""; // the same photo again still fires `change`
      if (file) match(file);
    });
  }
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) match(file);
  });
  $("confirm").addEventListener("click", () => sendFeedback(state.answer.matches[0].label));
  $("correct").addEventListener("click", () => sendFeedback($("correct-label").value));
  loadModel();
}

wire();
