// A read-only text box for a node's status: the dataset nodes' pre-flight report, what the memory node's `auto`
// picked, the train node's summary. Filled from the node's executed ui text; selectable, scrolls when long. Until
// the node has run it takes no room (a loaded workflow keeps its layout); its tooltip says what will show there.

const LINE_PX = 15; // 11px type at line-height 1.35, rounded up
const MAX_LINES = 14;
const PADDING_PX = 14; // left and right: 6px padding and a 1px border each
const FONT = "11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
let charWidth = null;

function measureChar() {
  if (charWidth === null) {
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = FONT;
    charWidth = ctx.measureText("0000000000").width / 10 || 6.6;
  }
  return charWidth;
}

export class StatusBox {
  constructor(what) {
    this.text = "";
    this.element = document.createElement("pre");
    this.element.className = "flt-status";
    this.element.title = what;
    this.set("");
  }

  set(text) {
    this.text = text || "";
    this.element.textContent = this.text;
    this.element.style.display = this.text ? "" : "none";
    this.element.dataset.hasText = this.text ? "true" : "false";
  }

  /** the height it asks for at `width` px: its lines as they wrap, at most MAX_LINES (then it scrolls); 0 empty */
  minHeight(width) {
    if (!this.text) return 0;
    const perLine = Math.max(8, Math.floor(((width || 300) - PADDING_PX) / measureChar() * 0.92));
    let lines = 0;
    for (const line of this.text.split("\n")) lines += Math.max(1, Math.ceil(line.length / perLine));
    return Math.min(lines, MAX_LINES) * LINE_PX + 10;
  }
}
