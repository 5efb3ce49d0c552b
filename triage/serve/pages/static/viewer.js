// The study page's image scroller: the images of a series in order, in a window (brain, subdural, bone), with the
// AI region on or off; rendered by the server from the stored DICOM (not for diagnostic use).
// Keys: [ and ] (or the slider with the arrow keys) move one image.
(function () {
  "use strict";
  const root = document.getElementById("viewer");
  if (!root) return;
  const study = root.dataset.study;
  const series = document.getElementById("viewer-series");
  const windowSelect = document.getElementById("viewer-window");
  const overlay = document.getElementById("viewer-overlay");
  const slider = document.getElementById("viewer-slice");
  const position = document.getElementById("viewer-position");
  const image = document.getElementById("viewer-image");
  let uids = [];

  function base() {
    return "/api/v1/studies/" + encodeURIComponent(study) + "/series/" + encodeURIComponent(series.value) + "/slices";
  }

  function show() {
    const index = Number(slider.value);
    const query = new URLSearchParams({ window: windowSelect.value, overlay: overlay.checked ? "true" : "false" });
    image.src = base() + "/" + index + ".png?" + query.toString();
    position.textContent = uids.length ? (index + 1) + " / " + uids.length : "";
  }

  async function load(startSop) {
    const response = await fetch(base(), { credentials: "same-origin" });
    if (!response.ok) { position.textContent = "images not available (" + response.status + ")"; return; }
    const data = await response.json();
    uids = data.sop_instance_uids || [];
    slider.max = String(Math.max(0, uids.length - 1));
    const start = startSop ? uids.indexOf(startSop) : -1;
    slider.value = String(start >= 0 ? start : Math.floor(uids.length / 2));
    show();
  }

  slider.addEventListener("input", show);
  windowSelect.addEventListener("change", show);
  overlay.addEventListener("change", show);
  series.addEventListener("change", () => load(""));
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT")) return;
    if (event.key === "]" || event.key === "[") {
      const step = event.key === "]" ? 1 : -1;
      slider.value = String(Math.min(Number(slider.max), Math.max(0, Number(slider.value) + step)));
      show();
    }
  });
  load(root.dataset.keySop || "");
})();
