// The admin page: the key comes in the URL fragment (#key=...), is kept for this tab only, and is
// sent as a bearer token. Everything shown is set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);

function key() {
  const m = location.hash.match(/^#key=(.+)$/);
  if (m) {
    sessionStorage.setItem("kiln-label-admin", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("kiln-label-admin") || "";
}

async function api(path, body) {
  const init = {headers: {"Authorization": `Bearer ${key()}`}};
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* keep the status line */ }
    throw new Error(message);
  }
  return response;
}

function kappa(k) {
  return k === null ? "n/a" : k.toFixed(3);
}

function render(r) {
  const lines = [
    `pairs: ${r.pairs}, votes: ${r.votes}, complete (>= ${r.labellers_per_pair} votes): ${r.complete}, unlabelled: ${r.unlabelled}`,
    "labellers: " + Object.entries(r.labellers).map(([n, c]) => `${n} ${c}`).join(", "),
    "outcomes: " + Object.entries(r.outcomes).map(([k, v]) => `${k.replace("_", " ")} ${v}`).join(", "),
  ];
  if (r.left_share !== null) lines.push(`position bias: left won ${Math.round(100 * r.left_share)}% of ${r.decisive_votes} decisive votes`);
  lines.push(`Fleiss' kappa: ${kappa(r.fleiss_kappa)} over ${r.fleiss_pairs} pairs with 2+ votes`);
  for (const c of r.cohen_kappa) lines.push(`Cohen's kappa ${c.labellers.join(" / ")}: ${kappa(c.kappa)} over ${c.pairs} pairs`);
  $("report").textContent = lines.join("\n");
}

async function refresh() {
  render(await (await api("/api/admin/report")).json());
  $("admin").hidden = false;
  $("status").textContent = "";
}

$("export").addEventListener("click", async () => {
  try {
    const blob = await (await api("/api/admin/export")).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "preferences.jsonl";
    a.click();
    URL.revokeObjectURL(a.href);
  } catch (e) { $("status").textContent = e.message; }
});

$("invite").addEventListener("click", async () => {
  try {
    const made = await (await api("/api/admin/invite", {name: $("name").value})).json();
    $("link").textContent = `${made.name}: ${new URL(made.link, location.origin)}`;
    await refresh();
  } catch (e) { $("status").textContent = e.message; }
});

const load = () => refresh().catch((e) => { $("status").textContent = e.message; });
window.addEventListener("hashchange", load);
load();
