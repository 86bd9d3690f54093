// Opens the gateway's Swagger UI in headless Chromium, as a person would: sees the sections,
// authorizes with a key, presses Try it out and Execute on an operation without typing a body
// (the example is prefilled), and reads the answer.
//
// Usage: node swagger_try_it_out.mjs GATEWAY_URL API_KEY SCREENSHOT_PATH [OPERATION_DOM_ID] [EXAMPLE]
// - OPERATION_DOM_ID defaults to OpenAI's chat; a mount's is e.g.
//   operations-groq-groq_createChatCompletion.
// - EXAMPLE is the named request example to pick ("request" by default; "stream" for the
//   streamed one). With "stream", a line {"first_event": …} is printed as soon as the response
//   panel shows an event while the answer is still open; the test then lets the stream finish.
// Prints one JSON line with what it saw last; exits non-zero on failure.
import { chromium } from "playwright-core";

const [gateway, apiKey, screenshot, operation = "operations-Chat-createChatCompletion", example = "request"] =
  process.argv.slice(2);
const timeout = 30_000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
  const external = [];
  page.on("request", (request) => {
    if (!request.url().startsWith(gateway)) external.push(request.url());
  });
  await page.goto(`${gateway}/docs`, { waitUntil: "load", timeout });
  await page.waitForSelector(".opblock", { timeout });
  const operations = await page.locator(".opblock").count();
  const sections = await page.locator("h3.opblock-tag").evaluateAll((tags) => tags.map((t) => t.dataset.tag));

  // Authorize with the bearer key.
  await page.click("button.authorize", { timeout });
  await page.fill(".auth-container input", apiKey, { timeout });
  await page.click(".auth-btn-wrapper button.authorize", { timeout });
  await page.click("button.btn-done", { timeout });

  // Try it out: open the operation, pick the example, press Execute without typing.
  const op = page.locator(`#${operation}`);
  await op.locator(".opblock-summary").click({ timeout });
  await op.locator("button.try-out__btn").click({ timeout });
  const body = op.locator("textarea.body-param__text");
  if (example !== "request") {
    await op.locator(".opblock-section-request-body .examples-select select").first().selectOption(example, { timeout });
  }
  await body.waitFor({ timeout });
  const prefilled = await body.inputValue();
  await op.locator("button.execute").click({ timeout });

  const answer = op.locator(".live-responses-table tr.response .response-col_description pre").first();
  const status = op.locator(".live-responses-table tr.response .response-col_status").first();
  if (example === "stream") {
    // The first event shows while the upstream still holds the rest back.
    await op.locator(".live-responses-table tr.response").filter({ hasText: "data:" }).first().waitFor({ timeout });
    console.log(JSON.stringify({ first_event: (await answer.innerText()).trim() }));
    await op.locator(".live-responses-table tr.response").filter({ hasText: "[DONE]" }).first().waitFor({ timeout });
  }
  await status.waitFor({ timeout });
  const statusText = (await status.innerText()).trim();
  const answerText = (await answer.innerText()).trim();
  // The picture: the prefilled request at the top, the answer under it.
  await op.locator(".opblock-section-request-body").evaluate((section) => section.scrollIntoView({ block: "start" }));
  await page.screenshot({ path: screenshot, fullPage: false });
  console.log(JSON.stringify({ operations, sections, prefilled, status: statusText, body: answerText, external }));
} finally {
  await browser.close();
}
