// The labelling page. Model completions are untrusted: they are only ever set with textContent.
"use strict";

const KEYS = {"1": "left", "a": "left", "2": "right", "b": "right", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad"};
const state = {csrf: "", pair: null, busy: false};
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const init = {credentials: "same-origin", headers: {}};
  if (body !== undefined) {
    init.method = "POST";
    init.headers = {"Content-Type": "application/json", "X-CSRF-Token": state.csrf};
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function showProgress(p) {
  $("progress").textContent = `you: ${p.done} labelled, ${p.left} left · all: ${p.votes}/${p.target} votes`;
}

function show(data) {
  state.csrf = data.csrf;
  state.pair = data.pair;
  $("who").textContent = `labelling as ${data.name}`;
  showProgress(data.progress);
  $("task").hidden = !data.pair;
  if (!data.pair) {
    say("Nothing left for you to label. Thank you!");
    return;
  }
  $("pair-id").textContent = `pair ${data.pair.id}`;
  $("prompt").textContent = data.pair.prompt;
  $("left").textContent = data.pair.left;
  $("right").textContent = data.pair.right;
}

function setBusy(busy) {
  state.busy = busy;
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = busy;
}

async function load() {
  show(await api("/api/next"));
}

async function vote(choice) {
  if (state.busy || !state.pair) return;
  setBusy(true);
  try {
    const result = await api("/api/vote", {pair_id: state.pair.id, choice, comment: $("comment").value});
    $("comment").value = "";
    say(result.recorded ? "Saved." : "Already saved.");
    await load();
  } catch (e) {
    say(`Not saved: ${e.message}`, true);
    if (e.status === 404 || e.status === 403) await load().catch(() => {});
  } finally {
    setBusy(false);
  }
}

async function start() {
  const join = location.hash.match(/^#join=([A-Za-z0-9_-]{1,200})$/);
  if (join) {
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar and history
    await api("/api/session", {token: join[1]});
  }
  await load();
}

for (const b of document.querySelectorAll("button[data-choice]")) {
  b.addEventListener("click", () => vote(b.dataset.choice));
}
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target === $("comment")) {
    if (e.key === "Escape") $("comment").blur();
    return;
  }
  const key = e.key.toLowerCase();
  if (key === "c" && state.pair) {
    e.preventDefault();
    $("comment").focus();
  } else if (KEYS[key]) {
    e.preventDefault();
    vote(KEYS[key]);
  }
});
// An invite link opened in a tab already on this page changes only the fragment: join then too.
window.addEventListener("hashchange", () => start().catch((e) => say(e.message, true)));
start().catch((e) => say(e.message, true));
