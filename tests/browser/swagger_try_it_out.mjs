// Opens the gateway's Swagger UI in headless Chromium, as a person would: sees the operations,
// authorizes with a key, runs Try-it-out on POST /v1/chat/completions and reads the answer.
//
// Usage: node swagger_try_it_out.mjs GATEWAY_URL API_KEY SCREENSHOT_PATH [OPERATION_DOM_ID]
// (the operation defaults to OpenAI's chat; a mount's is e.g. operations-groq-groq_createChatCompletion)
// Prints one JSON line with what it saw; exits non-zero on failure.
import { chromium } from "playwright-core";

const [gateway, apiKey, screenshot, operation = "operations-Chat-createChatCompletion"] =
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

  // Authorize with the bearer key.
  await page.click("button.authorize", { timeout });
  await page.fill(".auth-container input", apiKey, { timeout });
  await page.click(".auth-btn-wrapper button.authorize", { timeout });
  await page.click("button.btn-done", { timeout });

  // Try it out on POST /v1/chat/completions (or the mount's copy of it).
  const op = page.locator(`#${operation}`);
  await op.locator(".opblock-summary").click({ timeout });
  await op.locator("button.try-out__btn").click({ timeout });
  await op
    .locator("textarea.body-param__text")
    .fill(JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "Hi from Swagger UI" }] }), {
      timeout,
    });
  await op.locator("button.execute").click({ timeout });
  const status = op.locator(".live-responses-table tr.response .response-col_status").first();
  await status.waitFor({ timeout });
  const statusText = (await status.innerText()).trim();
  const body = (await op.locator(".live-responses-table tr.response .response-col_description pre").first().innerText()).trim();
  await op.scrollIntoViewIfNeeded();
  await page.screenshot({ path: screenshot, fullPage: false });
  console.log(JSON.stringify({ operations, status: statusText, body, external }));
} finally {
  await browser.close();
}
