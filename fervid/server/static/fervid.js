// The page's calls to the API: the bearer token (if the server has tokens) is kept in this browser's storage.
const fervid = {
  token() { return localStorage.getItem("fervid-token") || ""; },
  setupToken() {
    const input = document.getElementById("token");
    input.value = fervid.token();
    input.addEventListener("change", () => { localStorage.setItem("fervid-token", input.value.trim()); location.reload(); });
  },
  async api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (fervid.token()) headers["Authorization"] = "Bearer " + fervid.token();
    const r = await fetch(path, Object.assign({}, options, { headers }));
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const e = await r.json(); msg = e.detail || msg; } catch (_) {}
      const err = new Error(msg); err.status = r.status; throw err;
    }
    return r;
  },
  async json(path, options) { return (await fervid.api(path, options)).json(); },
  // A download through fetch, so that the token travels in a header rather than in the URL.
  async download(path, name) {
    const blob = await (await fervid.api(path)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name; a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  },
  mmss(s) { s = Math.max(0, s); return String(Math.floor(s / 60)).padStart(2, "0") + ":" + String(Math.floor(s % 60)).padStart(2, "0"); },
  esc(s) { return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); },
};
