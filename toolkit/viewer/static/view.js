/* mclx view: predicted expression over the slide.
 *
 * The slide is an OpenSeadragon Deep Zoom image (level-0 pixels are image coordinates);
 * the predictions are drawn on a canvas laid over it, one square per tile (one circle
 * per spot), coloured by the chosen gene through a 256-colour table:
 *   index = min(255, floor(256 * (v - min) / (max - min)))   over the gene's slide range.
 * Squares are batched by colour, so a redraw costs one fill per colour. A click finds the
 * tile under the pointer through a grid of cells one tile wide and lists its top genes.
 * `window.mclxView` exposes the state for tests and for the console.
 */
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("mclx-data").textContent);
  const TOP = 10;
  const MAX_MATCHES = 50;

  function floats(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }

  const n = data.n_obs;
  const genes = data.genes;
  const G = genes.length;
  const xs = floats(data.x);
  const ys = floats(data.y);
  const values = floats(data.values);
  const geneIndex = new Map(genes.map((g, j) => [g, j]));
  const half = data.size / 2;
  const circle = data.shape === "circle";
  const $ = (id) => document.getElementById(id);
  const fmt = (v) => Number(v).toPrecision(4);

  // ---- colouring -------------------------------------------------------------------
  let cur = null; // {gene, j, column, lo, hi, order, starts}
  let selected = -1;
  let drawn = 0;

  function colourIndex(v, lo, hi) {
    return hi > lo ? Math.min(255, Math.floor((256 * (v - lo)) / (hi - lo))) : 0;
  }

  function colouring(gene) {
    const j = geneIndex.get(gene);
    const column = new Float32Array(n);
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < n; i++) {
      const v = values[i * G + j];
      column[i] = v;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    // counting sort of the observations by colour: one fill per colour when drawing
    const bins = new Uint8Array(n);
    const starts = new Uint32Array(257);
    for (let i = 0; i < n; i++) {
      bins[i] = colourIndex(column[i], lo, hi);
      starts[bins[i] + 1]++;
    }
    for (let b = 0; b < 256; b++) starts[b + 1] += starts[b];
    const fill = starts.slice(0, 256);
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i++) order[fill[bins[i]]++] = i;
    return { gene, j, column, lo, hi, bins, order, starts };
  }

  // ---- viewer and overlay ----------------------------------------------------------
  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "openseadragon/images/",
    tileSources: data.dzi,
    drawer: "canvas", // images from file:// cannot be WebGL textures
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    gestureSettingsMouse: { clickToZoom: false },
    maxZoomPixelRatio: 4,
  });
  const overlay = document.createElement("canvas");
  overlay.className = "overlay";
  viewer.canvas.appendChild(overlay);

  function toScreen(item) {
    const o = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const e = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1, 0));
    return { ox: o.x, oy: o.y, s: e.x - o.x };
  }

  function draw() {
    const item = viewer.world.getItemAt(0);
    if (!item || !cur) return;
    const w = viewer.container.clientWidth;
    const h = viewer.container.clientHeight;
    const dpr = window.devicePixelRatio || 1;
    if (overlay.width !== Math.round(w * dpr) || overlay.height !== Math.round(h * dpr)) {
      overlay.width = Math.round(w * dpr);
      overlay.height = Math.round(h * dpr);
      overlay.style.width = w + "px";
      overlay.style.height = h + "px";
    }
    const ctx = overlay.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const { ox, oy, s } = toScreen(item);
    const r = half * s;
    let count = 0;
    for (let b = 0; b < 256; b++) {
      const a = cur.starts[b];
      const z = cur.starts[b + 1];
      if (a === z) continue;
      ctx.fillStyle = data.lut[b];
      ctx.beginPath();
      for (let k = a; k < z; k++) {
        const i = cur.order[k];
        const cx = ox + xs[i] * s;
        const cy = oy + ys[i] * s;
        if (cx + r < 0 || cy + r < 0 || cx - r > w || cy - r > h) continue;
        if (circle) {
          ctx.moveTo(cx + r, cy);
          ctx.arc(cx, cy, Math.max(r, 0.5), 0, 2 * Math.PI);
        } else {
          // whole pixels: neighbouring tiles share an edge, with no seam between them
          const x0 = Math.round(cx - r);
          const y0 = Math.round(cy - r);
          ctx.rect(x0, y0, Math.max(1, Math.round(cx + r) - x0), Math.max(1, Math.round(cy + r) - y0));
        }
        count++;
      }
      ctx.fill();
    }
    if (selected >= 0) outline(ctx, ox + xs[selected] * s, oy + ys[selected] * s, r);
    drawn = count;
  }

  function outline(ctx, cx, cy, r) {
    for (const [colour, width] of [["#000", 4], ["#fff", 2]]) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      ctx.beginPath();
      if (circle) ctx.arc(cx, cy, Math.max(r, 3), 0, 2 * Math.PI);
      else ctx.rect(cx - Math.max(r, 3), cy - Math.max(r, 3), 2 * Math.max(r, 3), 2 * Math.max(r, 3));
      ctx.stroke();
    }
  }

  viewer.addHandler("update-viewport", draw);
  viewer.addHandler("resize", draw);
  viewer.addHandler("open", draw);
  viewer.addHandler("open-failed", (ev) => {
    $("slide-name").textContent += " (the slide's tiles could not be opened: " + ev.message + ")";
  });

  // ---- finding the tile under the pointer ------------------------------------------
  const cellSize = data.size;
  const grid = new Map();
  const cellKey = (cx, cy) => cx * 1048576 + cy;
  for (let i = 0; i < n; i++) {
    const key = cellKey(Math.floor(xs[i] / cellSize), Math.floor(ys[i] / cellSize));
    if (!grid.has(key)) grid.set(key, []);
    grid.get(key).push(i);
  }

  function pick(px, py) {
    const cx = Math.floor(px / cellSize);
    const cy = Math.floor(py / cellSize);
    let best = -1;
    let bestD = Infinity;
    for (let dx = -1; dx <= 1; dx++) {
      for (let dy = -1; dy <= 1; dy++) {
        for (const i of grid.get(cellKey(cx + dx, cy + dy)) || []) {
          const ex = px - xs[i];
          const ey = py - ys[i];
          const inside = circle
            ? ex * ex + ey * ey <= half * half
            : Math.abs(ex) <= half && Math.abs(ey) <= half;
          const d = ex * ex + ey * ey;
          if (inside && d < bestD) {
            best = i;
            bestD = d;
          }
        }
      }
    }
    return best;
  }

  viewer.addHandler("canvas-click", (ev) => {
    if (!ev.quick) return; // the end of a drag
    const item = viewer.world.getItemAt(0);
    if (!item) return;
    const p = item.viewerElementToImageCoordinates(ev.position);
    select(pick(p.x, p.y));
  });

  // ---- side panel ------------------------------------------------------------------
  function topGenes(i) {
    const row = values.subarray(i * G, (i + 1) * G);
    const idx = Array.from(row.keys());
    idx.sort((a, b) => row[b] - row[a] || a - b);
    return idx.slice(0, TOP).map((j) => [genes[j], row[j]]);
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function showSelection() {
    const box = $("selection");
    box.replaceChildren();
    if (selected < 0) {
      box.innerHTML = '<p class="hint">Click a tile to see its top genes.</p>';
      return;
    }
    const i = selected;
    const h = document.createElement("h2");
    h.id = "sel-id";
    h.textContent = data.ids[i];
    const where = document.createElement("div");
    where.id = "sel-where";
    where.textContent = "centre (" + xs[i].toFixed(0) + ", " + ys[i].toFixed(0) + ") px, level 0";
    const now = document.createElement("div");
    now.id = "sel-current";
    now.textContent = cur.gene + ": " + fmt(cur.column[i]);
    const caption = document.createElement("div");
    caption.className = "hint";
    caption.textContent = "Top " + Math.min(TOP, G) + " predicted genes (click one to colour by it):";
    const table = document.createElement("table");
    table.id = "top-genes";
    for (const [g, v] of topGenes(i)) {
      const tr = document.createElement("tr");
      tr.dataset.gene = g;
      if (g === cur.gene) tr.className = "current";
      cell(tr, g, "gene");
      cell(tr, fmt(v), "value");
      tr.addEventListener("click", () => setGene(g));
      table.appendChild(tr);
    }
    box.append(h, where, now, caption, table);
  }

  function select(i) {
    selected = i;
    showSelection();
    draw();
  }

  function legend() {
    $("legend-gene").textContent = cur.gene;
    $("legend-min").textContent = fmt(cur.lo);
    $("legend-max").textContent = fmt(cur.hi);
    const bar = $("colorbar").getContext("2d");
    data.lut.forEach((c, b) => {
      bar.fillStyle = c;
      bar.fillRect(b, 0, 1, 14);
    });
  }

  function setGene(gene) {
    if (!geneIndex.has(gene)) return false;
    cur = colouring(gene);
    $("gene-search").value = gene;
    $("gene-matches").replaceChildren();
    $("gene-count").textContent = G + " genes";
    legend();
    showSelection();
    draw();
    return true;
  }

  function matches(query) {
    const q = query.trim().toLowerCase();
    if (!q) return [];
    const exact = [];
    const prefix = [];
    const inner = [];
    for (const g of genes) {
      const l = g.toLowerCase();
      if (l === q) exact.push(g);
      else if (l.startsWith(q)) prefix.push(g);
      else if (l.includes(q)) inner.push(g);
    }
    return exact.concat(prefix, inner);
  }

  function listMatches(query) {
    const found = matches(query);
    const ul = $("gene-matches");
    ul.replaceChildren();
    for (const g of found.slice(0, MAX_MATCHES)) {
      const li = document.createElement("li");
      li.textContent = g;
      li.dataset.gene = g;
      if (cur && g === cur.gene) li.className = "current";
      li.addEventListener("mousedown", (ev) => {
        ev.preventDefault();
        setGene(g);
      });
      ul.appendChild(li);
    }
    $("gene-count").textContent = query.trim()
      ? found.length + " of " + G + " genes match" + (found.length > MAX_MATCHES ? " (first " + MAX_MATCHES + " shown)" : "")
      : G + " genes";
  }

  const search = $("gene-search");
  search.placeholder = "search " + G + " genes";
  search.addEventListener("input", () => listMatches(search.value));
  search.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      const found = matches(search.value);
      if (found.length) setGene(found[0]);
    } else if (ev.key === "Escape") {
      search.value = cur ? cur.gene : "";
      $("gene-matches").replaceChildren();
    }
  });

  const opacity = $("opacity");
  const applyOpacity = () => (overlay.style.opacity = String(opacity.value / 100));
  opacity.addEventListener("input", applyOpacity);
  applyOpacity();

  // ---- header ----------------------------------------------------------------------
  function header() {
    const m = data.meta;
    const base = (p) => String(p).split(/[\\/]/).pop();
    $("slide-name").textContent = base(m.slide);
    $("slide-name").title = m.slide;
    const t = m.timings || {};
    const parts = ["read", "encode", "retrieve", "write"].filter((k) => k in t);
    const items = [
      ["slide", base(m.slide), m.slide],
      ["vendor", m.slide_vendor + (m.slide_mpp > 0 ? ", " + fmt(m.slide_mpp) + " µm/px" : "")],
      ["checkpoint", m.checkpoint_fingerprint.slice(0, 12), m.checkpoint_fingerprint],
      ["bank", base(m.bank), m.bank],
      ["backend", [m.backend, m.precision, m.device].filter(Boolean).join(" / ")],
      ["retrieval", "k=" + m.k + ", " + m.distance],
      ["tiles", n + " (" + m.tiles_from + "), " + G + " genes"],
      ["timings", "total" in t ? t.total.toFixed(1) + " s (" + parts.map((k) => k + " " + t[k].toFixed(1)).join(", ") + ")" : ""],
      ["predictions", base(m.predictions), m.predictions],
    ];
    const dl = $("provenance");
    for (const [key, text, title] of items) {
      const div = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = key;
      dd.textContent = text;
      dd.dataset.key = key;
      if (title) dd.title = title;
      div.append(dt, dd);
      dl.appendChild(div);
    }
  }

  header();
  setGene(data.gene);

  window.mclxView = {
    viewer,
    data,
    overlay,
    setGene,
    select,
    pick,
    matches,
    get gene() {
      return cur.gene;
    },
    get range() {
      return [cur.lo, cur.hi];
    },
    get drawn() {
      return drawn;
    },
    get selected() {
      return selected;
    },
    fullyLoaded() {
      const item = viewer.world.getItemAt(0);
      return !!item && item.getFullyLoaded();
    },
    onScreen(i) {
      // element coordinates of observation i's centre
      const { ox, oy, s } = toScreen(viewer.world.getItemAt(0));
      return [ox + xs[i] * s, oy + ys[i] * s];
    },
    overlayPixel(x, y) {
      const dpr = window.devicePixelRatio || 1;
      return Array.from(overlay.getContext("2d").getImageData(Math.floor(x * dpr), Math.floor(y * dpr), 1, 1).data);
    },
  };
})();
