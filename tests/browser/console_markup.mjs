// Stored text that looks like markup, in a real headless Chromium: each page
// showing what a peer, a user or another operator wrote must show it as
// text, run none of it, and load nothing it names.  Run by
// tests/integration/test_console.py, which stores the text first.
//
// Stored text holding bidirectional controls (overrides, isolates, marks) or
// other control characters likewise: shown with each as its \u escape (SHOWN),
// none raw in the page's text or tooltips, and right-to-left text isolated in
// a <bdi>, so that nothing can turn round what is shown around it.
//
// Environment: BASE_URL, ADMIN_TOKEN, MARKUP (the text stored), SHOWN (how it
// is shown, when not as stored), PAGES (the console routes to visit,
// comma-separated), CAUSEWAY_NODE_MODULES, CHROMIUM.
//
// Output: one JSON line per check {"check", "ok", "detail"}; exit status 1
// on the first failed check.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BASE = env('BASE_URL').replace(/\/$/, '') + '/admin/';
const MARKUP = env('MARKUP');
const SHOWN = process.env.SHOWN || MARKUP;
const PAGES = env('PAGES').split(',');
const require = createRequire(env('CAUSEWAY_NODE_MODULES') + '/');
const { chromium } = require('playwright-core');
const WAIT = 15000;
const report = (check, ok, detail) => process.stdout.write(JSON.stringify({ check, ok, detail }) + '\n');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
let failed = false;
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  const events = []; // dialogs, requests to anything but the daemon's console and API, page errors
  page.on('dialog', (d) => { events.push(`dialog: ${d.message()}`); d.dismiss(); });
  page.on('pageerror', (e) => events.push(`page error: ${e.message}`));
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (!(u.origin === new URL(BASE).origin && u.pathname.startsWith('/admin/'))) events.push(`request: ${r.url()}`);
  });
  await page.goto(BASE);
  await page.getByLabel('Admin token').fill(env('ADMIN_TOKEN'));
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#who').filter({ hasText: 'config (admin)' }).waitFor({ timeout: WAIT });
  for (const route of PAGES) {
    const name = `${route}: the stored text is shown as text and runs nothing`;
    try {
      await page.evaluate((h) => { location.hash = h; }, route);
      await page.waitForFunction(() => !document.querySelector('main [aria-busy], main .loading')
        && document.querySelector('main [data-page]'), null, { timeout: WAIT });
      // The text itself in the page's text: as stored, or as JSON shows it
      // (an audit record's details, folded when long, are JSON).
      await page.waitForFunction((m) => [m, JSON.stringify(m).slice(1, -1)]
        .some((x) => document.querySelector('main').textContent.includes(x)), SHOWN, { timeout: WAIT });
      const found = await page.evaluate(() => {
        const main = document.querySelector('main');
        // gateway/utf8.c's cw_utf8_display_control, but the tab and the line feed
        const control = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/;
        const rtl = /[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]/;
        const texts = [];
        for (let w = document.createTreeWalker(main, NodeFilter.SHOW_TEXT); w.nextNode();) texts.push(w.currentNode);
        const attrs = [...main.querySelectorAll('[title], [aria-label]')]
          .flatMap((el) => [el.getAttribute('title'), el.getAttribute('aria-label')]).filter((x) => x);
        return {
          pwned: window.__pwned ?? null,
          elements: main.querySelectorAll('img, script, iframe, svg a, [onerror], [onclick], a[href^="javascript"], '
            + 'b.planted').length,
          controls: texts.map((t) => t.data).concat(attrs).filter((x) => control.test(x)).map((x) => JSON.stringify(x)),
          unisolated: texts.filter((t) => rtl.test(t.data) && !t.parentElement.closest('bdi')).map((t) => t.data),
        };
      });
      assert.deepEqual(found, { pwned: null, elements: 0, controls: [], unisolated: [] });
      assert.deepEqual(events, []);
      report(name, true, null);
    } catch (e) {
      report(name, false, `${e.message} ${JSON.stringify(events)}`);
      failed = true;
      break;
    }
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
