// DOM helpers. Text only: user-supplied strings are always set with textContent or as
// attribute values, never parsed as HTML.

export const $ = (id) => document.getElementById(id);

/** `el("div", {class: "x", dataset: {user: id}}, "text", child)`. */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

const KNOWN = new Set(["online", "away", "busy"]);
/** CSS class of a status (custom statuses share one colour). */
export function statusClass(status) {
  return KNOWN.has(status) ? `s-${status}` : "s-other";
}

export function clock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

export function since(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.round(m / 60);
  if (h < 48) return `${h}h`;
  return `${Math.round(h / 24)}d`;
}

export function fmt(n) {
  return Number(n || 0).toLocaleString();
}

let toastTimer = null;
export function toast(message) {
  const t = $("toast");
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    t.hidden = true;
  }, 3500);
}

/**
 * A virtualised list: only the rows in (and near) the viewport exist. Rows have a fixed height;
 * `render(item, row)` fills a recycled row element for an item.
 */
export class VirtualList {
  constructor(container, rowHeight, create, fill) {
    this.container = container;
    this.spacer = container.querySelector(".vlist-spacer");
    this.rowHeight = rowHeight;
    this.create = create;
    this.fill = fill;
    this.items = [];
    this.rows = new Map(); // index -> element
    this.pool = [];
    this.frame = 0;
    container.addEventListener("scroll", () => this.schedule(), { passive: true });
    new ResizeObserver(() => this.schedule()).observe(container);
  }

  setItems(items) {
    this.items = items;
    this.container.dataset.count = String(items.length);
    this.spacer.style.height = `${items.length * this.rowHeight}px`;
    // Contents may have changed at the same indices: refill everything visible.
    for (const [i, row] of this.rows) {
      this.pool.push(row);
      row.remove();
      this.rows.delete(i);
    }
    this.draw();
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const h = this.rowHeight;
    const top = this.container.scrollTop;
    const height = this.container.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / h) - 8);
    const last = Math.min(this.items.length, Math.ceil((top + height) / h) + 8);
    for (const [i, row] of this.rows) {
      if (i < first || i >= last) {
        this.rows.delete(i);
        row.remove();
        this.pool.push(row);
      }
    }
    for (let i = first; i < last; i++) {
      if (this.rows.has(i)) continue;
      const row = this.pool.pop() || this.create();
      row.style.transform = `translateY(${i * h}px)`;
      this.fill(this.items[i], row);
      this.container.append(row);
      this.rows.set(i, row);
    }
  }
}
