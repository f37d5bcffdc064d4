// Test-only helpers evaluated in the ComfyUI page by tests/test_browser.py (page.add_script_tag): they use the
// page's own `app`, `api` and LiteGraph, as a user's clicks would, and record the websocket events the page gets.
(() => {
  const app = window.app;
  const api = window.comfyAPI?.api?.api ?? app.api;
  const events = [];
  const record = (type) => api.addEventListener(type, ({ detail }) => {
    events.push({ type, detail: detail instanceof Blob ? { size: detail.size } : detail, t: performance.now() });
  });
  for (const type of ["execution_start", "executed", "execution_success", "execution_error", "execution_interrupted",
                      "execution_cached"]) {
    record(type);
  }
  api.addEventListener("b_preview_with_metadata", ({ detail }) => {
    events.push({ type: "preview", detail: { node: detail.displayNodeId, size: detail.blob?.size }, t: performance.now() });
  });

  const byType = (type) => app.graph._nodes.filter((n) => n.type === type);
  const widget = (node, name) => node.widgets?.find((w) => w.name === name);

  window.__fltTest = {
    events,
    /** record these events too (the train node's, named by trainer/event_schema.py) */
    record: (types) => types.forEach(record),
    clientId: () => api.clientId,
    byType: (type) => byType(type).map((n) => n.id),
    widgetValues(id) {
      const n = app.graph.getNodeById(id);
      return Object.fromEntries((n.widgets ?? []).filter((w) => w.options?.serialize !== false).map((w) => [w.name, w.value]));
    },
    /** set widgets by name on a node, as a user's edit (callback included) */
    set(id, values) {
      const n = app.graph.getNodeById(id);
      for (const [name, value] of Object.entries(values)) {
        const w = widget(n, name);
        if (!w) throw new Error(`node ${id} (${n.type}) has no widget ${name}`);
        const old = w.value;
        w.value = value;
        w.callback?.(w.value, app.canvas, n, [0, 0], undefined);
        n.onWidgetChanged?.(name, w.value, old, w);
      }
      app.graph.setDirtyCanvas(true, true);
    },
    /** replace every node of a stock type by another type taking the same widgets, keeping id, place and links */
    swapType(from, to) {
      const swapped = [];
      for (const old of byType(from)) {
        const fresh = window.LiteGraph.createNode(to);
        if (!fresh) throw new Error(`no node type ${to}`);
        const values = Object.fromEntries((old.widgets ?? []).map((w) => [w.name, w.value]));
        const targets = (old.outputs ?? []).map((o) => (o.links ?? []).map((id) => {
          const link = app.graph.links[id] ?? app.graph._links?.get?.(id);
          return [link.target_id, link.target_slot];
        }));
        const { id, pos, size, title } = old;
        app.graph.remove(old);
        fresh.id = id;
        app.graph.add(fresh);
        fresh.pos = [pos[0], pos[1]];
        fresh.size = [size[0], size[1]];
        fresh.title = title;
        for (const w of fresh.widgets ?? []) if (w.name in values) w.value = values[w.name];
        targets.forEach((list, slot) => list.forEach(([target, targetSlot]) => {
          fresh.connect(slot, app.graph.getNodeById(target), targetSlot);
        }));
        swapped.push(id);
      }
      return swapped;
    },
    /** graphToPrompt's prompt, through JSON as it goes over the wire (undefined values become null or vanish) */
    async prompt() {
      return JSON.parse(JSON.stringify((await app.graphToPrompt()).output));
    },
    /** expand a collapsed node and move it below the rest of the graph (where nothing overlaps it), or to the
     *  right of node `beside` (in front of what is there) */
    openApart(id, beside) {
      const n = app.graph.getNodeById(id);
      if (n.flags?.collapsed) n.collapse();
      const others = app.graph._nodes.filter((o) => o !== n);
      const b = beside === undefined ? null : app.graph.getNodeById(beside);
      n.pos = b ? [b.pos[0] + b.size[0] + 30, b.pos[1]]
        : [Math.min(...others.map((o) => o.pos[0])), Math.max(...others.map((o) => o.pos[1] + o.size[1])) + 80];
      app.canvas.bringToFront?.(n);
      app.graph.setDirtyCanvas(true, true);
    },
    /** the current graph cut down to the pack's settings and train nodes, expanded, laid out in columns (for a
     *  screenshot where no node overlaps another) */
    async onlyOurs() {
      const wf = JSON.parse(JSON.stringify(app.graph.serialize()));
      const columns = [["FluxLoraTrainerModels", "FluxLoraTrainerOptimizer", "FluxLoraTrainerMemory"],
                       ["FluxLoraTrainerDataset", "FluxLoraTrainerDatasetToml"], ["FluxLoraTrainerNetwork"],
                       ["FluxLoraTrainerTrain"]];
      wf.nodes = wf.nodes.filter((n) => columns.flat().includes(n.type));
      const kept = new Set(wf.nodes.map((n) => n.id));
      wf.links = wf.links.filter((l) => kept.has(l[1]) && kept.has(l[3]));
      const links = new Set(wf.links.map((l) => l[0]));
      wf.groups = [];
      let x = 0;
      for (const column of columns) {
        let y = 0;
        let width = 0;
        for (const n of wf.nodes.filter((m) => column.includes(m.type))) {
          n.flags = {};
          n.pos = [x, y];
          for (const i of n.inputs ?? []) if (!links.has(i.link)) i.link = null;
          for (const o of n.outputs ?? []) o.links = (o.links ?? []).filter((l) => links.has(l));
          y += n.size[1] + 60;
          width = Math.max(width, n.size[0]);
        }
        x += width + 40;
      }
      await app.loadGraphData(wf);
    },
    /** the current graph cut down to the nodes `columns` lists (each list one column of node ids, top to bottom),
     *  groups left out, `sizes` ({id: [width, height]}) applied, reloaded: part of a graph laid out for a
     *  screenshot, with the pack's status texts and charts (kept in the nodes' properties) */
    async arrange(columns, sizes = {}, gap = 40) {
      const wf = JSON.parse(JSON.stringify(app.graph.serialize()));
      const kept = new Set(columns.flat());
      wf.nodes = wf.nodes.filter((n) => kept.has(n.id));
      wf.links = wf.links.filter((l) => kept.has(l[1]) && kept.has(l[3]));
      const links = new Set(wf.links.map((l) => l[0]));
      wf.groups = [];
      const byId = new Map(wf.nodes.map((n) => [n.id, n]));
      const title = window.LiteGraph.NODE_TITLE_HEIGHT;
      let x = 0;
      for (const column of columns) {
        let y = 0;
        let width = 0;
        for (const n of column.map((id) => byId.get(id))) {
          if (sizes[n.id]) n.size = [...sizes[n.id]];
          n.pos = [x, y + title];
          for (const i of n.inputs ?? []) if (!links.has(i.link)) i.link = null;
          for (const o of n.outputs ?? []) o.links = (o.links ?? []).filter((l) => links.has(l));
          y += title + (n.flags?.collapsed ? 0 : n.size[1]) + gap;
          width = Math.max(width, n.flags?.collapsed ? 160 : n.size[0]);
        }
        x += width + gap;
      }
      await app.loadGraphData(wf);
    },
    /** push nodes down where a node above them grew over them (the example workflows are laid out for the nodes'
     *  own sizes; the chart, the picker and the status texts make ours taller) */
    makeRoom(gap = 30) {
      const box = (n) => {
        const b = new Float32Array(4);
        n.getBounding(b);
        return b; // [x, y (title included), width, height]
      };
      const nodes = [...app.graph._nodes].sort((a, b) => a.pos[1] - b.pos[1]);
      for (let i = 0; i < nodes.length; i++) {
        const a = box(nodes[i]);
        for (let j = i + 1; j < nodes.length; j++) {
          const b = box(nodes[j]);
          const overlapX = a[0] < b[0] + b[2] && b[0] < a[0] + a[2];
          const shift = a[1] + a[3] + gap - b[1];
          if (overlapX && b[1] >= a[1] && shift > 0) nodes[j].pos[1] += shift;
        }
      }
      app.graph.setDirtyCanvas(true, true);
    },
    /** show the nodes `ids` (all when empty) at zoom `scale` with their top-left at (x, y) in the viewport */
    frame(ids, scale = 1, x = 40, y = 40) {
      const nodes = ids?.length ? ids.map((i) => app.graph.getNodeById(i)) : app.graph._nodes;
      const left = Math.min(...nodes.map((n) => n.pos[0]));
      const top = Math.min(...nodes.map((n) => n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT));
      app.canvas.deselectAll?.(); // no selection outline or selection toolbox in screenshots
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [x / scale - left, y / scale - top];
      app.canvas.setDirty(true, true);
    },
  };
})();
