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
                      "execution_cached", "flux_lora_trainer.step", "flux_lora_trainer.status"]) {
    record(type);
  }
  api.addEventListener("b_preview_with_metadata", ({ detail }) => {
    events.push({ type: "preview", detail: { node: detail.displayNodeId, size: detail.blob?.size }, t: performance.now() });
  });

  const byType = (type) => app.graph._nodes.filter((n) => n.type === type);
  const widget = (node, name) => node.widgets?.find((w) => w.name === name);

  window.__fltTest = {
    events,
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
    /** show the nodes `ids` (all when empty) at zoom `scale` with their top-left at (x, y) in the viewport */
    frame(ids, scale = 1, x = 40, y = 40) {
      const nodes = ids?.length ? ids.map((i) => app.graph.getNodeById(i)) : app.graph._nodes;
      const left = Math.min(...nodes.map((n) => n.pos[0]));
      const top = Math.min(...nodes.map((n) => n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT));
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [x / scale - left, y / scale - top];
      app.canvas.setDirty(true, true);
    },
  };
})();
