// streamrec feed explorer: plain JavaScript over the public HTTP API (docs: /docs).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { user: null, stored: null, described: new Map(), userSearches: 0 };

function apiKey() { return sessionStorage.getItem("streamrec-api-key") || ""; }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function el(tag, props = {}, ...children) {
  const { dataset, ...rest } = props;
  const node = Object.assign(document.createElement(tag), rest);
  Object.assign(node.dataset, dataset || {});
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function fmt(value, digits = 0) {
  return value == null ? "—" : Number(value).toLocaleString(undefined,
    { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

// --- item descriptions (titles and categories where a catalogue was published) ----------
async function describe(ids) {
  const missing = [...new Set(ids)].filter((id) => !state.described.has(id));
  for (let i = 0; i < missing.length; i += 200) {
    const part = missing.slice(i, i + 200);
    const query = part.map((id) => "id=" + encodeURIComponent(id)).join("&");
    const { items } = await api("/v1/items?" + query);
    for (const id of part) state.described.set(id, items[id]);
  }
}

function itemLabel(id) {
  const description = state.described.get(id);
  const title = description && description.title ? description.title : id;
  const cats = description && description.categories && description.categories.length
    ? el("span", { className: "cats", textContent: " " + description.categories.join(" · ") })
    : null;
  return [el("span", { className: "title", textContent: title, title: id }), cats];
}

// --- live figures ---------------------------------------------------------------------------
async function refreshFigures() {
  try {
    const s = await api("/v1/stats");
    $("fig-rate").textContent = fmt(s.events_per_s, 1);
    $("fig-applied").textContent = fmt(s.events_applied);
    $("fig-lag").textContent = s.consumer_lag == null ? "unknown" : fmt(s.consumer_lag);
    $("fig-lag").title = s.lag_error || JSON.stringify(s.lag_by_partition);
    $("fig-fresh").textContent = s.freshness_p50_ms == null ? "no recent events"
      : `${fmt(s.freshness_p50_ms)} / ${fmt(s.freshness_p99_ms)} ms`;
    $("fig-dlq").textContent = `${fmt(s.dlq_messages + s.dlq_item_messages)} msgs`;
    $("fig-dlq").title = `events: ${s.dlq_messages}, item descriptions and item deltas: ` +
      `${s.dlq_item_messages}`;
    $("fig-workers").textContent = fmt(s.workers.length);
  } catch (error) {
    $("fig-rate").textContent = "stats unavailable";
    $("fig-rate").title = error.message;
  }
}

// --- users and trending ----------------------------------------------------------------------
async function findUsers(prefix) {
  const asked = ++state.userSearches;  // an older answer arriving late must not win
  const { users } = await api("/v1/users?limit=30&prefix=" + encodeURIComponent(prefix));
  if (asked !== state.userSearches) return;
  const list = $("users");
  list.replaceChildren(...users.map((user) => el("li", {},
    el("button", { type: "button", textContent: user, onclick: () => selectUser(user) }))));
  if (prefix && !users.includes(prefix)) {  // any id can be opened, even one with no activity
    list.append(el("li", {}, el("button", { type: "button", textContent: `open “${prefix}”`,
                                            onclick: () => selectUser(prefix) })));
  } else if (!users.length) {
    list.append(el("li", { textContent: "no user with recent activity" }));
  }
}

async function refreshTrending() {
  const top = await api("/v1/trending?k=10");
  await describe(top.map((t) => t.item_id));
  $("trending").replaceChildren(...top.map((t) => el("li", { dataset: { item: t.item_id } },
    ...itemLabel(t.item_id), el("span", { className: "cats", textContent: ` ${fmt(t.score, 1)}` }))));
}

// --- a user's lists --------------------------------------------------------------------------
function renderFeed(target, feed, previous) {
  const before = new Set(previous ? previous.items.map((i) => i.item_id) : []);
  target.replaceChildren(...feed.items.map((item) => {
    const explored = item.reason === "exploring";
    const row = el("li", { dataset: { item: item.item_id, position: item.position,
                                       reason: item.reason } },
      el("span", { className: "pos", textContent: item.position + 1 }),
      el("span", {}, ...itemLabel(item.item_id),
        explored ? el("span", { className: "badge",
          textContent: `exploring · p=${fmt(item.propensity, 3)}` }) : null),
      el("span", { className: "score", textContent: fmt(item.score, 3) }),
      el("span", { className: "why", textContent: item.reason }),
      el("span", { className: "actions" },
        el("button", { type: "button", textContent: "click", dataset: { action: "click" },
                       onclick: () => sendEvent("click", feed, item) }),
        el("button", { type: "button", textContent: "skip", dataset: { action: "skip" },
                       onclick: () => sendEvent("skip", feed, item) }),
        el("button", { type: "button", textContent: "similar",
                       onclick: () => showSimilar(item.item_id) })));
    if (previous && !before.has(item.item_id)) row.classList.add("new");
    return row;
  }));
}

function feedMeta(feed) {
  const when = new Date(feed.generated_at * 1000).toLocaleTimeString();
  return `${feed.source} · ${feed.model_version} · ${feed.policy} · ${when}`;
}

async function loadStored(previous) {
  const feed = await api(`/v1/users/${encodeURIComponent(state.user)}/feed`);
  await describe(feed.items.map((i) => i.item_id));
  renderFeed($("stored"), feed, previous);
  $("stored-meta").textContent = feedMeta(feed);
  $("stored").dataset.recommendation = feed.recommendation_id;
  state.stored = feed;
  return feed;
}

async function loadFresh() {
  const feed = await api(`/v1/users/${encodeURIComponent(state.user)}/recommendations?k=10`);
  await describe(feed.items.map((i) => i.item_id));
  renderFeed($("fresh"), feed, null);
  $("fresh-meta").textContent = feedMeta(feed);
}

async function loadHistory() {
  const { items } = await api(`/v1/users/${encodeURIComponent(state.user)}/history`);
  await describe(items.slice(0, 20));
  $("history").replaceChildren(...items.slice(0, 20).map((id) =>
    el("li", { dataset: { item: id } }, ...itemLabel(id))));
  if (!items.length) $("history").append(el("li", { textContent: "no recent items" }));
}

async function showSimilar(itemId) {
  const { items } = await api(`/v1/items/${encodeURIComponent(itemId)}/similar?k=10`);
  await describe([itemId, ...items.map((i) => i.item_id)]);
  $("similar-of").replaceChildren(...itemLabel(itemId));
  $("similar").replaceChildren(...items.map((i) => el("li", { dataset: { item: i.item_id } },
    ...itemLabel(i.item_id), el("span", { className: "cats", textContent: " " + i.reason }))));
  if (!items.length) $("similar").append(el("li", { textContent: "no similar items yet" }));
}

async function selectUser(user) {
  state.user = user;
  state.stored = null;
  history.replaceState(null, "", "#user=" + encodeURIComponent(user));
  $("user-id").textContent = user;
  $("user-view").hidden = false;
  $("empty-view").hidden = true;
  say("loading…");
  try {
    await Promise.all([loadStored(null), loadFresh(), loadHistory()]);
    say("");
  } catch (error) {
    say(error.message, true);
  }
}

function newEventId() {
  return crypto.randomUUID ? crypto.randomUUID()
    : `${Date.now().toString(16)}-${Math.random().toString(16).slice(2)}`;
}

// Post the event like any producer, then watch the stored feed until the worker and the
// feed builder have rebuilt it.
async function sendEvent(type, feed, item) {
  const event = { event_id: newEventId(), user_id: state.user, item_id: item.item_id, type,
                  timestamp: Date.now() / 1000, recommendation_id: feed.recommendation_id,
                  position: item.position };
  const sent = performance.now();
  try {
    await api("/v1/events", { method: "POST", body: JSON.stringify(event),
                              headers: { "Content-Type": "application/json" } });
  } catch (error) {
    say(`the ${type} was not accepted: ${error.message}`, true);
    return;
  }
  say(`${type} on ${item.item_id} sent; waiting for the feed to be rebuilt…`);
  const previous = state.stored;
  const deadline = sent + 20000;
  while (performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 400));
    const feed = await api(`/v1/users/${encodeURIComponent(state.user)}/feed`).catch(() => null);
    if (feed && previous && feed.recommendation_id !== previous.recommendation_id) {
      await loadStored(previous);
      await Promise.all([loadFresh(), loadHistory()]);
      say(`${type} on ${item.item_id}: feed rebuilt after `
          + `${((performance.now() - sent) / 1000).toFixed(1)} s (new items highlighted)`);
      return;
    }
  }
  await Promise.all([loadFresh(), loadHistory()]);
  say(`${type} on ${item.item_id} sent; the stored feed was not rebuilt within 20 s `
      + "(is a feed builder running?)", true);
}

// --- wiring ------------------------------------------------------------------------------------
function start() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", (e) => {
    sessionStorage.setItem("streamrec-api-key", e.target.value.trim());
    refreshFigures(); findUsers($("user-prefix").value).catch(() => {});
  });
  $("user-search").addEventListener("submit", (e) => {
    e.preventDefault();
    const prefix = $("user-prefix").value.trim();
    findUsers(prefix).catch((error) => say(error.message, true));
  });
  $("refresh").addEventListener("click", () => selectUser(state.user));
  refreshFigures();
  setInterval(refreshFigures, 3000);
  findUsers("").catch(() => {});
  refreshTrending().catch(() => {});
  const match = location.hash.match(/^#user=(.+)$/);
  if (match) selectUser(decodeURIComponent(match[1]));
}

start();
