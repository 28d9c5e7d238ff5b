// The labelling page. Every model output is set with textContent, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
let labeller = new URLSearchParams(location.search).get("labeller") || localStorage.getItem("rlhf-labeller") || "";
let current = null; // the item on screen
let choice = null;  // 1..5 once picked
let busy = false;

async function api(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function pick(value) {
  choice = value;
  for (const button of document.querySelectorAll("#choices button")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.choice) === value));
  }
  $("submit").disabled = choice === null;
}

function show(state) {
  current = state.item;
  const p = state.progress;
  $("progress").textContent = current
    ? `${p.mine + 1} of ${p.total}` + (p.complete ? ` · ${p.complete} complete` : "")
    : `${p.mine} of ${p.total}`;
  $("who").textContent = labeller;
  $("undo").disabled = !state.can_undo;
  $("done-undo").disabled = !state.can_undo;
  const a = state.agreement;
  $("agreement").textContent = a.direction === null ? "" :
    `Agreement between labellers: ${(100 * a.direction).toFixed(0)}% (${a.comparisons} comparisons)`;
  $("card").hidden = !current;
  $("done").hidden = !!current;
  if (current) {
    $("card").dataset.item = current.id;
    $("prompt").textContent = current.prompt;
    $("response-a").textContent = current.a;
    $("response-b").textContent = current.b;
  }
  $("comment").value = "";
  pick(null);
}

async function act(path, body) {
  if (busy) return;
  busy = true;
  try {
    show(await api(path, Object.assign({ labeller }, body)));
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = "Not saved: " + error.message;
  } finally {
    busy = false;
  }
}

function submit() {
  if (!current || choice === null) return;
  act("/api/label", { item: current.id, choice, a_is: current.a_is, comment: $("comment").value });
}

function start() {
  $("name-form").hidden = true;
  localStorage.setItem("rlhf-labeller", labeller);
  act("/api/state", {});
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#choices button")) {
    button.addEventListener("click", () => pick(Number(button.dataset.choice)));
  }
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", () => current && act("/api/skip", { item: current.id }));
  $("undo").addEventListener("click", () => act("/api/undo", {}));
  $("done-undo").addEventListener("click", () => act("/api/undo", {}));
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    labeller = $("name").value.trim();
    if (labeller) start();
  });
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || !$("name-form").hidden) return;
    const typing = event.target === $("comment");
    if (!typing && event.key === "u") {
      act("/api/undo", {});
      return;
    }
    if (!current) return;
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      submit();
    } else if (!typing && /^[1-5]$/.test(event.key)) {
      pick(Number(event.key));
    } else if (!typing && event.key === "s") {
      act("/api/skip", { item: current.id });
    }
  });
  if (labeller) start(); else $("name-form").hidden = false;
});
