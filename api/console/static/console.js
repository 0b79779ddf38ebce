// The console's only script of its own (the page allows no inline script): it sends the session's
// CSRF token with every htmx request and closes dialogs.
document.addEventListener("htmx:configRequest", (event) => {
  const token = document.body.dataset.csrfToken;
  if (token) event.detail.headers["X-CSRF-Token"] = token;
});
document.addEventListener("click", (event) => {
  const closer = event.target.closest("[data-close-dialog]");
  if (closer) closer.closest("dialog")?.remove();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") document.querySelector("#dialog dialog")?.remove();
});
