// attnrec web page: swap a page's #swap region in place (links and forms marked data-swap, and
// search-as-you-type on inputs marked data-live). The server renders every state; without this
// script the same links and forms load whole pages.
(() => {
  let inflight = null;
  async function swap(url, how, focusId) {  // how: "push", "replace" or null (the history entry)
    if (inflight) inflight.abort();
    inflight = new AbortController();
    let doc;
    try {
      const answer = await fetch(url, { signal: inflight.signal, credentials: "same-origin" });
      doc = new DOMParser().parseFromString(await answer.text(), "text/html");
    } catch (err) {
      if (err.name !== "AbortError") location.href = url;
      return;
    }
    const fresh = doc.getElementById("swap"), current = document.getElementById("swap");
    if (!fresh || !current) { location.href = url; return; }
    current.replaceWith(fresh);
    document.title = doc.title;
    if (how) history[how + "State"](null, "", url);
    const target = focusId && document.getElementById(focusId);
    if (target) { target.focus(); if (target.setSelectionRange) target.setSelectionRange(target.value.length, target.value.length); }
  }
  const formUrl = (form) => form.action + "?" + new URLSearchParams(new FormData(form));
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-swap]");
    if (!link || event.button || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    swap(link.href, "push", link.dataset.focus);
  });
  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-swap]");
    if (!form) return;
    event.preventDefault();
    swap(formUrl(form), "push", "q");
  });
  let timer = null;
  document.addEventListener("input", (event) => {
    const input = event.target.closest("[data-live]");
    if (!input) return;
    clearTimeout(timer);
    timer = setTimeout(() => swap(formUrl(input.form), "replace", input.id), 250);
  });
  window.addEventListener("popstate", () => { if (document.getElementById("swap")) swap(location.href, null, null); });
})();
