// The live view: fetch the fragment every data-seconds and put it in place; stop when the
// session ended (the page then says so on its next full load).
(function () {
  var live = document.getElementById("live");
  if (!live) return;
  var timer = setInterval(function () {
    fetch(live.dataset.source, {credentials: "same-origin"}).then(function (response) {
      if (!response.ok) { clearInterval(timer); return null; }
      return response.text();
    }).then(function (html) { if (html !== null) live.innerHTML = html; });
  }, Number(live.dataset.seconds) * 1000);
})();
