// The web console in a real headless Chromium (Debian's chromium, driven by
// playwright-core).  Run by tests/integration/test_console.py, which starts
// the daemon, the peers and the data, and answers this script's requests on
// stdin ("NEED <what>" on stdout, one line back).
//
// Environment: BASE_URL, ADMIN_TOKEN, VIEWER_TOKEN, SCREENSHOT_DIR,
// CAUSEWAY_NODE_MODULES (where playwright-core is installed), CHROMIUM
// (default /usr/bin/chromium).
//
// Output: one JSON line per check {"check", "ok", "detail"}; exit status 1
// on the first failed check.
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BASE = env('BASE_URL').replace(/\/$/, '') + '/admin/';
const ADMIN = env('ADMIN_TOKEN');
const VIEWER = env('VIEWER_TOKEN');
const SHOTS = env('SCREENSHOT_DIR');
const require = createRequire(env('CAUSEWAY_NODE_MODULES') + '/');
const { chromium } = require('playwright-core');

mkdirSync(SHOTS, { recursive: true });
const PAGES = ['dashboard', 'peers', 'rules', 'users', 'held', 'trace', 'deadletters', 'reports', 'audit', 'rooms', 'config'];
const WAIT = 15000;

// ------------------------------------------------------------ protocol

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(what) {
  process.stdout.write(`NEED ${what}\n`);
  const { value, done } = await lines.next();
  if (done) throw new Error(`the harness closed stdin (asked: ${what})`);
  return value.trim();
}
const report = (check, ok, detail) => process.stdout.write(JSON.stringify({ check, ok, detail }) + '\n');

// Runs one named check; the page's visible text goes with a failure.
let current = null;
async function check(name, fn) {
  try {
    const detail = await fn();
    report(name, true, detail === undefined ? null : detail);
  } catch (e) {
    let seen = '';
    try { seen = current ? (await current.locator('body').innerText()).slice(0, 1500) : ''; } catch { /* closed */ }
    report(name, false, `${e.message}\n--- page text ---\n${seen}`);
    throw e;
  }
}

// ------------------------------------------------------------ helpers

const problems = []; // console errors (other than failed loads), CSP violations, page errors
function watch(page, label) {
  page.on('console', (m) => {
    const t = m.text();
    if (/Content.Security.Policy|Refused to/i.test(t) || (m.type() === 'error' && !/Failed to load resource/.test(t)))
      problems.push(`${label}: console ${m.type()}: ${t}`);
  });
  page.on('pageerror', (e) => problems.push(`${label}: page error: ${e.message}`));
  return page;
}

const shot = (page, name) => page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });

// Waits until the page has loaded what it asked for (no busy region, no
// "Loading…" placeholder).
async function settled(page) {
  await page.waitForFunction(() => !document.querySelector('main [aria-busy], main .loading'), null, { timeout: WAIT });
}

// No "null", "undefined" or "[object Object]" shown where a value belongs.
async function noJunk(page) {
  const junk = await page.evaluate(() => {
    const out = [];
    const walk = document.createTreeWalker(document.querySelector('main'), NodeFilter.SHOW_TEXT);
    for (let n = walk.nextNode(); n; n = walk.nextNode())
      if (/^(null|undefined|NaN|\[object Object\])$/.test(n.textContent.trim()) && !n.parentElement.closest('pre, code')) out.push(n.textContent);
    return out;
  });
  assert.deepEqual(junk, [], 'placeholders of missing values shown');
}

async function go(page, hash) {
  await page.evaluate((h) => { location.hash = h; }, hash);
  await page.waitForFunction((h) => document.querySelector(`[data-page="${h.split('/')[1]}"]`), hash, { timeout: WAIT });
  await settled(page);
  await noJunk(page);
}

async function signIn(page, token, name, role) {
  await page.getByLabel('Admin token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#who').filter({ hasText: `${name} (${role})` }).waitFor({ timeout: WAIT });
  await settled(page);
}

// Every button is marked as a change control or as a read-only one.
async function buttonsMarked(page) {
  const unmarked = await page.$$eval('button', (bs) => bs
    .filter((b) => !b.hasAttribute('data-change') && !b.hasAttribute('data-read')).map((b) => b.textContent));
  assert.deepEqual(unmarked, [], 'buttons neither data-change nor data-read');
}

const statNumber = async (page, key) => {
  const el = page.locator(`[data-stat="${key}"]`);
  if ((await el.count()) === 0) return null;
  const n = Number((await el.first().textContent()).trim());
  return Number.isFinite(n) ? n : null;
};

// ------------------------------------------------------------ the scenario

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
let failed = false;
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = current = watch(await ctx.newPage(), 'desktop');

  await check('sign-in page', async () => {
    const r = await page.goto(BASE);
    assert.equal(r.status(), 200);
    await page.getByLabel('Admin token').waitFor();
    assert.equal(await page.locator('nav#nav').isVisible(), false, 'no navigation before signing in');
    await shot(page, '01-sign-in');
  });

  await check('a wrong token is refused', async () => {
    await page.getByLabel('Admin token').fill('cwa_not-a-token');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByText('The token was refused').waitFor({ timeout: WAIT });
    assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'nothing kept');
  });

  // Every Authorization header the page sends to the API.
  const sent = [];
  page.on('request', (r) => { if (new URL(r.url()).pathname.startsWith('/admin/v1/')) sent.push(r.headers().authorization); });

  await check('a token with an invisible character inside is refused, and not sent', async () => {
    // A zero-width space (which the browser cannot send: until the
    // forty-seventh session "the daemon could not be reached"), a soft
    // hyphen and a no-break space (sent as Latin-1 bytes, a token no hash
    // matches), a space: each named, nothing sent, nothing kept.
    const said = [];
    for (const [ch, name] of [['\u200b', 'U+200B (a zero-width space)'], ['\u00ad', 'U+00AD (a soft hyphen)'],
      ['\u00a0', 'U+00A0 (a no-break space)'], [' ', 'U+0020 (a space)']]) {
      const before = sent.length;
      await page.getByLabel('Admin token').fill(ADMIN.slice(0, 10) + ch + ADMIN.slice(10));
      await page.getByRole('button', { name: 'Sign in' }).click();
      const err = page.locator('.signin .note .error');
      await err.filter({ hasText: `character 11 is ${name}` }).waitFor({ timeout: WAIT })
        .catch(async (e) => { throw new Error(`${e.message}: the page says ${await err.allInnerTexts()}`); });
      const text = await err.innerText();
      assert.match(text, /^The token was not sent/, text);
      assert.equal(sent.length, before, 'a request went out');
      assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'nothing kept');
      said.push(text);
    }
    return said[0];
  });

  await check('sign in as admin', async () => {
    // pasted with a byte order mark, zero-width and white space around it
    await signIn(page, '\ufeff\u200b \t' + ADMIN + '\u200b\u00a0\u2060 ', 'config', 'admin');
    assert.equal(await page.evaluate(() => location.hash), '#/dashboard');
    const stored = await page.evaluate(() => Object.keys(sessionStorage));
    assert.deepEqual(stored, ['causeway.admin_token']);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('causeway.admin_token')), ADMIN, 'kept trimmed');
    assert.deepEqual([...new Set(sent)], ['Bearer ' + ADMIN], 'only the token itself went out');
    const cookies = await ctx.cookies();
    assert.deepEqual(cookies, [], 'no cookies');
  });

  await check('dashboard shows live numbers', async () => {
    await page.locator('[data-stat="queue.held"]').waitFor({ timeout: WAIT });
    const before = (await statNumber(page, 'total.peer.in')) || 0;
    const sent = Number(await ask('traffic'));
    assert.ok(sent > 0);
    // the page refreshes itself every 5 s: wait for the new messages to show
    await page.waitForFunction(([b, n]) => {
      const el = document.querySelector('[data-stat="total.peer.in"]');
      return el && Number(el.textContent) >= b + n;
    }, [before, sent], { timeout: 20000 });
    const got = {
      in: await statNumber(page, 'total.peer.in'), out: await statNumber(page, 'total.peer.out'),
      held: await statNumber(page, 'queue.held'), dead: await statNumber(page, 'queue.dead'),
    };
    assert.ok(got.in > 0 && got.out > 0, `messages in and out: ${JSON.stringify(got)}`);
    assert.ok(got.held >= 1, 'a held message');
    assert.ok(got.dead >= 1, 'a dead letter');
    assert.ok((await page.locator('svg.chart polyline').count()) >= 2, 'one line per adapter and direction');
    assert.ok((await page.locator('.legend li').count()) >= 2, 'a legend');
    assert.match(await page.locator('svg.chart').getAttribute('aria-label'), /Messages per minute/);
    assert.ok((await page.locator('[data-adapter]').count()) >= 1, 'adapter health');
    assert.equal(await page.locator('main .error').count(), 0, 'no error state');
    await shot(page, '02-dashboard');
    return got;
  });

  await check('a hidden tab asks for nothing until it is shown again', async () => {
    const asked = [];
    const onRequest = (r) => { if (/\/(stats|adapters)$/.test(new URL(r.url()).pathname)) asked.push(Date.now()); };
    const visible = (shown) => page.evaluate((v) => {
      Object.defineProperty(document, 'hidden', { configurable: true, get: () => !v });
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (v ? 'visible' : 'hidden') });
      document.dispatchEvent(new Event('visibilitychange'));
    }, shown);
    await visible(false);
    // The refresh due next finds the tab hidden and asks nothing (a refresh
    // already asked for may still come back before it): from then on,
    // a refresh's time and a second with nothing asked.  Until the
    // fifty-seventh session a fixed 1 s and 11 s were waited out.
    await page.locator('p.updated').filter({ hasText: 'Paused while this tab is hidden' }).waitFor({ timeout: WAIT });
    page.on('request', onRequest);
    try {
      await page.waitForTimeout(6000);
      assert.deepEqual(asked, [], 'nothing asked while hidden');
      assert.match(await page.locator('p.updated').innerText(), /Paused while this tab is hidden/);
      const shown = Date.now();
      await visible(true);
      await page.waitForFunction(() => /^Updated /.test(document.querySelector('p.updated').textContent), null,
        { timeout: 4000 });
      assert.ok(asked.length >= 2 && asked[0] - shown < 2000, `asked again at once: ${asked.map((t) => t - shown)}`);
    } finally {
      page.off('request', onRequest);
      await page.evaluate(() => { delete document.hidden; delete document.visibilityState; });
    }
  });

  await check('the chart draws every minute of the window, the oldest too', async () => {
    // An hour's window touches 61 minutes (05:02 to 06:02 for now 06:02:30):
    // until the fiftieth session's review the chart drew 60, from 05:03,
    // and the oldest minute's messages (in the totals) were not on it.
    const doc = { window_s: 3600, now: '2026-11-29T06:02:30.000Z',
      throughput: [{ minute: '2026-11-29T05:02:00Z', adapter: 'peer', direction: 'in', count: 7 },
        { minute: '2026-11-29T06:02:00Z', adapter: 'peer', direction: 'in', count: 3 }],
      totals: [{ adapter: 'peer', direction: 'in', count: 10 }],
      queue: { pending: 0, in_flight: 0, held: 0, dead: 0, failed: 0 }, latency_ms: { count: 0 }, decisions: [] };
    const fake = (route) => route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(doc) });
    await page.route('**/admin/v1/stats', fake);
    try {
      await go(page, '#/peers');
      await go(page, '#/dashboard');
      await page.locator('[data-stat="total.peer.in"]').filter({ hasText: /^10$/ }).waitFor({ timeout: WAIT });
      const pts = (await page.locator('svg.chart polyline').getAttribute('points')).split(' ');
      assert.equal(pts.length, 61, 'a point for each minute the window touches');
      // the oldest minute's 7, the highest, at the chart's left edge and top
      assert.equal(pts[0], '40.0,10.0', pts.slice(0, 3).join(' '));
      assert.equal(pts[60].split(',')[0], '630.0', 'the last minute at the right edge');
      assert.ok(pts.slice(1, 60).every((p) => p.endsWith(',196.0')), 'the minutes between at 0');
      // each grid line's label is the value at its height (the middle one
      // was drawn at 3.5 and said 4 until the fiftieth session's review)
      const ticks = await page.$$eval('svg.chart text.tick[x="36"]',
        (ts) => ts.map((t) => [t.textContent, Number(t.getAttribute('y'))]));
      assert.deepEqual(ticks.map(([v]) => v), ['0', '4', '7'], JSON.stringify(ticks));
      for (const [v, ty] of ticks) assert.ok(Math.abs(ty - 4 - (10 + 186 * (1 - Number(v) / 7))) < 0.01, JSON.stringify(ticks));
    } finally {
      await page.unroute('**/admin/v1/stats', fake);
    }
  });

  await check('keyboard reaches the navigation', async () => {
    await page.keyboard.press('Tab'); // the skip link
    let label = '';
    for (let i = 0; i < 12 && label !== 'Peers'; i++) {
      await page.keyboard.press('Tab');
      label = await page.evaluate(() => document.activeElement && document.activeElement.textContent);
    }
    assert.equal(label, 'Peers', 'Tab reaches the Peers link');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => location.hash === '#/peers');
    await settled(page);
  });

  await check('a destructive action asks first (cancelled)', async () => {
    const row = page.locator('tr', { hasText: 'spam.example' });
    await row.getByRole('button', { name: 'Disable' }).click();
    const dlg = page.locator('dialog[open]');
    await dlg.waitFor();
    assert.match(await dlg.innerText(), /Disable peer sp\?/);
    await shot(page, '03-peers-confirm');
    await dlg.getByRole('button', { name: 'Cancel' }).click();
    await dlg.waitFor({ state: 'detached' });
    await settled(page);
    assert.equal(await row.locator('.badge').innerText(), 'enabled');
  });

  let ruleId = null;
  await check('add a deny rule', async () => {
    await go(page, '#/rules');
    const form = page.locator('form[aria-label="Add a rule"]');
    await form.getByLabel('Scope').selectOption('domain');
    await form.getByLabel('Pattern').fill('spam.example');
    await form.getByLabel('Mode').selectOption('deny');
    await form.getByLabel('Comment').fill('console test: no spam');
    await form.getByRole('button', { name: 'Add rule' }).click();
    const ok = page.locator('.note .ok', { hasText: 'added' });
    await ok.waitFor({ timeout: WAIT });
    ruleId = Number((await ok.innerText()).match(/Rule (\d+) added/)[1]);
    await page.locator('tr', { hasText: 'console test: no spam' }).waitFor({ timeout: WAIT });
    await shot(page, '04-rules');
    return { rule: ruleId };
  });

  await check('a refused change shows the problem detail', async () => {
    const form = page.locator('form[aria-label="Add a rule"]');
    await form.getByLabel('Scope').selectOption('domain');
    await form.getByLabel('Pattern').fill('spam.example');
    await form.getByRole('button', { name: 'Add rule' }).click();
    await page.locator('.note .error', { hasText: 'a rule with that scope and pattern exists' }).waitFor({ timeout: WAIT });
    await form.getByLabel('Pattern').fill('Not A Domain');
    await form.getByRole('button', { name: 'Add rule' }).click();
    await page.locator('.note .error', { hasText: 'pattern must be a lower-case domain' }).waitFor({ timeout: WAIT });
  });

  await check('change a setting', async () => {
    const form = page.locator('form[aria-label="Server-wide settings"]');
    await form.getByLabel('policy.report_limit_threshold').fill('5');
    await form.getByRole('button', { name: 'Save settings' }).click();
    await page.locator('.note .ok', { hasText: 'Saved: policy.report_limit_threshold' }).waitFor({ timeout: WAIT });
  });

  await check('a setting emptied is not saved as 0', async () => {
    // 0 is "no bound" for this one: an emptied field was sent as Number("")
    // until the forty-seventh session, and the bound was gone.
    const key = 'policy.consent_requests_per_user_per_day';
    const form = page.locator('form[aria-label="Server-wide settings"]');
    const box = form.getByLabel(key);
    const before = await box.inputValue();
    assert.match(before, /^[1-9][0-9]*$/);
    const patches = [];
    const seen = (r) => { if (r.method() === 'PATCH') patches.push(r.postData()); };
    page.on('request', seen);
    await box.fill('');
    await form.getByRole('button', { name: 'Save settings' }).click();
    await page.waitForTimeout(1000);
    page.off('request', seen);
    assert.deepEqual(patches, [], 'a PATCH went out');
    assert.equal(await box.evaluate((el) => el.validity.valueMissing), true, 'the field says it is needed');
    const now = await page.evaluate(() => fetch('/admin/v1/settings', {
      headers: { Authorization: 'Bearer ' + sessionStorage.getItem('causeway.admin_token') } }).then((r) => r.json()));
    assert.equal(String(now['policy.consent_requests_per_user_per_day']), before);
    await box.fill(before);
  });

  await check('the next message is denied, and its trace says why', async () => {
    const id = await ask('denied');
    assert.match(id, /^msg_/);
    await go(page, `#/trace/${id}`);
    await page.locator('[data-verdict="deny"]').first().waitFor({ timeout: WAIT });
    const why = await page.locator('main').innerText();
    assert.ok((await page.locator('[data-reason="server_denied_domain"]').count()) >= 1, 'reason server_denied_domain');
    assert.match(why, new RegExp(`rule ${ruleId}: domain spam\\.example → deny`));
    assert.match(why, /console test: no spam/);
    assert.match(why, /a server rule denies the remote party's domain/);
    await shot(page, '05-trace-denied');
    // The rule unreadable for a moment (the daemon busy) is not "since
    // deleted", as it was until the fiftieth session's review.
    const busy = (route) => route.fulfill({ status: 503, contentType: 'application/problem+json',
      body: JSON.stringify({ title: 'Service Unavailable', status: 503, code: 'unavailable', detail: 'try again' }) });
    await page.route('**/admin/v1/rules/*', busy);
    try {
      await page.getByRole('button', { name: 'Refresh' }).click();
      await page.locator('main', { hasText: `rule ${ruleId} (could not be read:` }).waitFor({ timeout: WAIT });
      const said = await page.locator('main').innerText();
      assert.doesNotMatch(said, /since deleted/, said);
      assert.match(said, /try again/, said);
    } finally {
      await page.unroute('**/admin/v1/rules/*', busy);
    }
    return { message: id };
  });

  let deadMsg = null;
  await check('replay a dead letter and see it delivered', async () => {
    await go(page, '#/deadletters');
    deadMsg = await ask('heal');
    const row = page.locator('tr', { hasText: deadMsg });
    await row.waitFor({ timeout: WAIT });
    assert.match(await row.innerText(), /dead/);
    await shot(page, '06-deadletters');
    await row.getByRole('button', { name: 'Replay' }).click();
    await page.locator('.note .ok', { hasText: 'replayed' }).waitFor({ timeout: WAIT });
    await page.getByRole('link', { name: 'Follow it in the trace' }).click();
    await page.waitForFunction((m) => location.hash === `#/trace/${m}`, deadMsg);
    await settled(page);
    const delivery = page.locator('article.delivery', { hasText: 'peer:tg' });
    const deadline = Date.now() + 20000;
    while ((await delivery.getAttribute('data-state')) !== 'delivered') {
      assert.ok(Date.now() < deadline, `still ${await delivery.getAttribute('data-state')}`);
      await page.waitForTimeout(500);
      await page.getByRole('button', { name: 'Refresh' }).click();
      await settled(page);
    }
    assert.ok((await delivery.locator('.badge.b-ok').count()) >= 1, 'the successful try is listed');
    await shot(page, '07-trace-delivered');
    return { message: deadMsg };
  });

  await check('a replay answered 409 shows why, and the row its state now', async () => {
    // The dead letter is replayed behind the page's back (another tab,
    // causewayctl): the page's Replay is 409 "only a dead letter"; the
    // list is read again, and the row, no longer dead, leaves it.  Until
    // the forty-seventh session it stayed, its Replay answering 409 again.
    const again = await ask('another dead letter');
    await go(page, '#/deadletters');
    const row = page.locator('tr', { hasText: again });
    await row.waitFor({ timeout: WAIT });
    await ask('replay it elsewhere');
    await row.getByRole('button', { name: 'Replay' }).click();
    const err = page.locator('main .note .error[role="alert"]');
    await err.waitFor({ timeout: WAIT });
    const said = await err.innerText();
    assert.match(said, /only a dead letter can be replayed/, said);
    assert.match(said, /\(409 conflict\)/, said);
    await page.waitForFunction((m) => ![...document.querySelectorAll('main tr')].some((r) => r.textContent.includes(m)),
      again, { timeout: WAIT });
    assert.equal(await err.count(), 1, 'the problem is still shown');
    await shot(page, 'admin-06b-replay-409');
    return said;
  });

  await check('a destination filter that matches nothing says so', async () => {
    // The server matches a destination whole.  Until the forty-seventh
    // session the empty list said every delivery got through; from then
    // until the fiftieth session's review the field and the list named
    // xmpp:<component domain>, which no delivery has (every XMPP
    // component's rows are "xmpp", docs/schema.md).
    await go(page, '#/deadletters');
    assert.equal(await page.getByLabel('Destination').getAttribute('placeholder'), 'peer:tg, matrix, xmpp');
    await page.getByLabel('Destination').fill('xmpp:chat.example');
    await page.getByRole('button', { name: 'Show' }).click();
    // (the unfiltered list's empty state stays shown until the filtered one comes)
    const empty = page.locator('main .paged .empty');
    await empty.filter({ hasText: ' to xmpp:chat.example' }).waitFor({ timeout: WAIT })
      .catch(async (e) => { throw new Error(`${e.message}: the list says ${await empty.innerText()}`); });
    const said = await empty.innerText();
    assert.match(said, /^No dead letters to xmpp:chat\.example \(a destination is matched whole: peer:<name>, matrix or xmpp,/,
      said);
    assert.doesNotMatch(said, /got through|component domain/, said);
    return said;
  });

  await check('a list answered late for a filter changed since is not shown', async () => {
    // The audit records of rules are asked for and answered slowly; the
    // filter is changed meanwhile to an actor of none, whose answer comes
    // first: the slow one, answered after it, is dropped (until the
    // forty-seventh session its rows replaced the empty list, under a
    // filter that was no longer theirs).  The delay is the page's own
    // fetch's (a route's handlers run in turn).
    await go(page, '#/audit');
    await page.evaluate(() => {
      const real = window.fetch;
      window.__realFetch = real;
      window.fetch = (u, o) => (String(u).includes('action=rule.')
        ? new Promise((ok) => setTimeout(ok, 1500)).then(() => real(u, o)) : real(u, o));
    });
    try {
      const filters = page.locator('main form.filters');
      await filters.getByLabel('Action').fill('rule.');
      await filters.getByRole('button', { name: 'Show' }).click();
      await filters.getByLabel('Action').fill('');
      await filters.getByLabel('Actor').fill('admin:nobody');
      await filters.getByRole('button', { name: 'Show' }).click();
      await page.locator('main .paged .empty', { hasText: 'No audit entries match' }).waitFor({ timeout: WAIT });
      await page.waitForTimeout(2500); // the slow answer has come by now
      assert.equal(await page.locator('main .paged tbody tr').count(), 0, 'rows of the filter before shown');
      assert.equal(await page.locator('main .paged .empty').count(), 1);
    } finally {
      await page.evaluate(() => { window.fetch = window.__realFetch; });
    }
  });

  await check('an option waiting for a restart shows the value it waits with', async () => {
    // GET /config's pending (since the fifty-first session): the daemon's
    // own answer, one restart-only option given a value waiting.
    const fake = async (r) => {
      const real = await r.fetch();
      const doc = await real.json();
      for (const o of doc.options) if (o.section === 'database' && o.name === 'pool_size') o.pending = '9';
      await r.fulfill({ response: real, json: doc });
    };
    await page.route('**/admin/v1/config', fake);
    try {
      await go(page, '#/config');
      const waiting = page.locator('[data-pending="database.pool_size"]');
      await waiting.waitFor({ timeout: WAIT });
      assert.equal((await waiting.innerText()).trim(), 'After a restart: 9');
      assert.equal(await page.locator('[data-pending]').count(), 1, 'only that one');
    } finally {
      await page.unroute('**/admin/v1/config', fake);
    }
  });

  await check('a long audit detail is folded between characters', async () => {
    // "comment: " and 50 letters are 59 UTF-16 units: the emoji after them
    // was cut in half by the 60-unit summary until the fiftieth session's
    // review.
    const comment = 'a'.repeat(50) + '\u{1F600}' + 'b'.repeat(40);
    const rows = [{ id: 1, at: '2026-11-29T06:01:00.000Z', actor: 'admin:config', action: 'rule.create', reason: null,
      rule_id: null, message: null, subject: null, details: { comment } }];
    const fake = (r) => r.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify({ rows, next_after: null }) });
    const audit = /\/admin\/v1\/audit\?/;
    await page.route(audit, fake);
    try {
      await go(page, '#/peers'); // from the audit page the check before left
      await go(page, '#/audit');
      const summary = page.locator('main details.details summary');
      await summary.first().waitFor({ timeout: WAIT });
      const said = await summary.first().textContent();
      assert.equal(said, 'comment: ' + 'a'.repeat(50) + '\u{1F600}' + '…', JSON.stringify(said));
    } finally {
      await page.unroute(audit, fake);
    }
  });

  await check('allow a held sender', async () => {
    await go(page, '#/held');
    const row = page.locator('tr', { hasText: 'mimi://wa.example/u/wally' });
    await row.getByRole('button', { name: 'Allow sender' }).click();
    await page.locator('.note .ok', { hasText: '1 released' }).waitFor({ timeout: WAIT });
    await settled(page);
    assert.equal(await page.locator('tr', { hasText: 'mimi://wa.example/u/wally' }).count(), 0, 'no longer held');
    await page.locator('main .empty').waitFor();
  });

  await check('a consent of a domain of no peer is marked', async () => {
    // Stored (by the test, in SQL) as one stored before the admin API
    // refused such consents (the forty-first session): it matches no one,
    // and the users page says so; a consent of a peer's user is not marked.
    await go(page, '#/users');
    const odd = page.locator('main li', { hasText: 'nowhere.example' });
    await odd.first().waitFor({ timeout: WAIT });
    const said = await odd.first().innerText();
    assert.match(said, /no peer has this domain: matches no one/, said);
    const wally = page.locator('main li', { hasText: 'mimi://wa.example/u/wally' });
    await wally.first().waitFor({ timeout: WAIT });
    assert.doesNotMatch(await wally.first().innerText(), /no peer/);
    return said;
  });

  await check('every page as admin: loads, no error state, every button marked', async () => {
    for (const [i, p] of PAGES.entries()) {
      await go(page, `#/${p}`);
      await buttonsMarked(page);
      const errors = await page.locator('main .error').allInnerTexts();
      assert.deepEqual(errors, [], `error state on ${p}`);
      await shot(page, `admin-${String(i).padStart(2, '0')}-${p}`);
    }
    await go(page, '#/rooms');
    assert.ok((await page.locator('main td', { hasText: 'Book club' }).count()) === 1, 'a group\'s name in the list');
    await page.locator('main table a').first().click();
    await page.waitForFunction(() => /^#\/rooms\/./.test(location.hash));
    // The list stays, settled, until the room's page replaces it: wait for
    // what only the room's page has before looking at it.
    await page.getByRole('link', { name: 'All rooms' }).waitFor({ timeout: WAIT });
    await settled(page);
    await noJunk(page);
    assert.ok((await page.locator('section', { hasText: 'Members' }).locator('tbody tr').count()) >= 2, 'a room\'s members');
    await shot(page, 'admin-11-room');
    await go(page, '#/rules');
    assert.ok((await page.locator('[data-change]').count()) > 0, 'an admin sees change controls');
  });

  let group = null;
  await check('remove a peer\'s user from a group', async () => {
    group = await ask('group');
    await go(page, `#/rooms/${group}`);
    await page.getByRole('link', { name: 'All rooms' }).waitFor({ timeout: WAIT });
    await settled(page);
    const members = page.locator('section', { hasText: 'Members' });
    const row = (uri) => members.locator('tbody tr', { hasText: uri });
    const dan = 'mimi://wa.example/u/dan', alice = 'mimi://example.org/u/alice';
    await row(dan).waitFor({ timeout: WAIT });
    // A local member is not removed here: they leave through their own client.
    assert.equal(await row(alice).getByRole('button', { name: 'Remove' }).count(), 0, 'no Remove for a local user');
    assert.equal(await row('mimi://spam.example/u/carol').getByRole('button', { name: 'Remove' }).count(), 1);
    await row(dan).getByRole('button', { name: 'Remove' }).click();
    const dlg = page.locator('dialog[open]');
    await dlg.waitFor();
    assert.match(await dlg.innerText(), /Remove mimi:\/\/wa\.example\/u\/dan from the room\?/);
    await shot(page, 'admin-12-room-remove-confirm');
    await dlg.getByRole('button', { name: 'Remove' }).click();
    await page.locator('.note .ok', { hasText: `${dan} removed from the room.` }).waitFor({ timeout: WAIT });
    await page.waitForFunction((u) => [...document.querySelectorAll('main tbody tr')]
      .some((tr) => tr.textContent.includes(u) && tr.textContent.includes('left')), dan, { timeout: WAIT });
    await settled(page);
    assert.equal(await row(dan).getByRole('button', { name: 'Remove' }).count(), 0, 'no Remove for one who left');
    await buttonsMarked(page);
    await shot(page, 'admin-13-room-removed');
    // The peers of the group were told, once each.
    const told = JSON.parse(await ask('removed'));
    assert.deepEqual(told, { gk: 1, sp: 1 });
    return { group, told };
  });

  await check('a big group\'s members come a page at a time', async () => {
    // 60 members: a page of 50, then the other 10 (a gatekeeper's group of
    // thousands was drawn whole until the thirty-seventh session).
    const big = await ask('big group');
    await go(page, `#/rooms/${big}`);
    // From another room's page: wait for this one's before looking.
    await page.locator('main h2', { hasText: `Room ${big}` }).waitFor({ timeout: WAIT });
    await settled(page);
    const rows = page.locator('section', { hasText: 'Members' }).locator('tbody tr');
    const uris = async () => (await rows.locator('td[data-label="Member"]').allInnerTexts()).map((t) => t.trim());
    const first = await uris();
    assert.equal(first.length, 50, 'the first page holds 50 members');
    assert.equal(await page.getByRole('button', { name: 'Previous page' }).count(), 0);
    assert.match(await page.locator('main dl').innerText(), /Members\s+60/, 'the count is of every member');
    await shot(page, 'admin-14-room-paged');
    // Clicked twice before the next page comes (a double click): one page
    // turned, so that "Previous page" comes back to the first.
    await page.evaluate(() => { const b = [...document.querySelectorAll('main button')]
      .find((x) => x.textContent === 'Next page'); b.click(); b.click(); });
    await page.waitForFunction(() => document.querySelectorAll('main section tbody tr').length === 10, null,
      { timeout: WAIT });
    await settled(page);
    const second = await uris();
    assert.equal(second.length, 10);
    assert.equal(new Set([...first, ...second]).size, 60, 'no member twice, none missing');
    assert.equal(await page.getByRole('button', { name: 'Next page' }).count(), 0, 'the last page');
    await page.getByRole('button', { name: 'Previous page' }).click();
    await page.waitForFunction(() => document.querySelectorAll('main section tbody tr').length === 50, null,
      { timeout: WAIT });
    await settled(page);
    assert.deepEqual(await uris(), first);
    await noJunk(page);
    await buttonsMarked(page);
    return { first: first.length, second: second.length };
  });

  await check('a failing call shows its problem as an error state', async () => {
    const body = JSON.stringify({ type: 'about:blank', title: 'Service unavailable', status: 503,
      detail: 'the database is not reachable', code: 'unavailable' });
    const fail = (r) => r.fulfill({ status: 503, contentType: 'application/problem+json', body });
    await page.route('**/admin/v1/stats', fail);
    await go(page, '#/dashboard');
    const err = page.locator('main .error[role="alert"]');
    await err.first().waitFor({ timeout: WAIT });
    assert.match(await err.first().innerText(), /Service unavailable the database is not reachable \(503 unavailable\)/);
    assert.ok((await page.locator('[data-adapter]').count()) >= 1, 'the rest of the page still works');
    await shot(page, 'admin-12-error-state');
    await page.unroute('**/admin/v1/stats', fail);
    await page.locator('[data-stat="queue.held"]').waitFor({ timeout: WAIT }); // the next refresh recovers
  });

  await check('an answer that is not the daemon\'s JSON is said so', async () => {
    // A proxy's sign-in page, answered 200: until the fiftieth session's
    // review the page said "Cannot read properties of null".
    const page200 = (r) => r.fulfill({ status: 200, contentType: 'text/html', body: '<html><body>Sign in to the proxy</body></html>' });
    await page.route('**/admin/v1/peers', page200);
    try {
      await go(page, '#/peers');
      const err = page.locator('main .error[role="alert"]');
      await err.first().waitFor({ timeout: WAIT });
      const said = await err.first().innerText();
      assert.match(said, /^Not the daemon's answer the answer to GET \/peers is not a JSON object: is a proxy in front/, said);
      assert.doesNotMatch(said, /null/, said);
    } finally {
      await page.unroute('**/admin/v1/peers', page200);
    }
  });

  await check('a change whose answer is lost may have been done, and says so', async () => {
    // The request goes out and the connection drops before an answer: the
    // daemon may have made the token (a repeat is 409, the token never
    // shown).  Until the thirty-sixth session the console said only that
    // the daemon "could not be reached", as if nothing had been sent.
    const lost = (r) => (r.request().method() === 'POST' ? r.abort('connectionreset') : r.continue());
    await page.route('**/admin/v1/tokens', lost);
    await go(page, '#/users');
    const form = page.getByRole('form', { name: 'Create a token' });
    await form.getByLabel('Name').fill('lost-answer');
    await form.getByRole('button', { name: 'Create token' }).click();
    const err = page.locator('main .note .error[role="alert"]');
    await err.first().waitFor({ timeout: WAIT });
    const said = await err.first().innerText();
    assert.match(said, /may have been done/, said);
    assert.match(said, /look before you repeat it/, said);
    await page.unroute('**/admin/v1/tokens', lost);
    await shot(page, 'admin-12-lost-answer');
    return said;
  });

  await check('add a peer pasted with white space around its fields', async () => {
    const raw = generateKeyPairSync('ed25519').publicKey.export({ format: 'der', type: 'spki' }).subarray(-32);
    await go(page, '#/peers');
    const form = page.getByRole('form', { name: 'Add a peer' });
    await form.getByLabel('Name').fill(' console-peer ');
    await form.getByLabel('Domain').fill('console.example\t');
    await form.getByLabel('Mode').selectOption('pull');
    await form.getByLabel('Public key').fill(' ' + raw.toString('base64') + '  ');
    await form.getByRole('button', { name: 'Add peer' }).click();
    const ok = page.locator('main .note .token', { hasText: 'Peer console-peer added' });
    await ok.waitFor({ timeout: WAIT }).catch(async (e) => {
      throw new Error(`${e.message}: the page says ${await page.locator('main .note').innerText()}`);
    });
    assert.match(await ok.locator('input').inputValue(), /^\S{20,}$/, 'its token shown');
    await page.locator('main tr', { hasText: 'console.example' }).waitFor({ timeout: WAIT });
  });

  await check('a push URL nothing is pushed to is said under it, as text', async () => {
    // sp's push_url, stored before the admin API checked it: its rows wait
    // untried, and GET /peers says why (push_url_problem).  Until the
    // fiftieth session's review the console showed such a peer as any other.
    const problem = await ask('a push url stored before its check');
    const tail = '. Nothing is pushed to it; its rows wait, untried, until a good push URL is given ';
    await go(page, '#/dashboard');
    await go(page, '#/peers');
    const said = page.locator('main tr', { hasText: 'spam.example' }).locator('[data-push-url-problem]');
    assert.equal(await said.innerText(), 'Push URL problem: ' + problem + tail + '(PATCH /admin/v1/peers/sp).');
    assert.equal(await page.locator('main [data-push-url-problem]').count(), 1, 'the other peers have none');
    assert.doesNotMatch(await page.locator('main tr', { hasText: 'spam.example' }).innerText(), /:pw@/);
    await shot(page, 'admin-15-push-url-problem');
    // Markup and controls in it (a daemon's text as any other) are shown as text.
    const hostile = '<b class="planted">bold</b><img src=x onerror="window.__pwned=1"> \u202eexe.pdf\u0085';
    const doc = { peers: [{ name: 'xp', domain: 'xp.example', mode: 'push', enabled: true,
      push_url: 'https://********@xp.example/', event_types: null, created_at: '2026-12-01T00:00:00.000Z',
      updated_at: '2026-12-01T00:00:00.000Z', disabled_at: null, push_url_problem: hostile }] };
    const fake = (route) => route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(doc) });
    await page.route('**/admin/v1/peers', fake);
    try {
      await go(page, '#/dashboard');
      await go(page, '#/peers');
      const el = page.locator('main [data-push-url-problem]');
      await el.waitFor({ timeout: WAIT });
      assert.equal(await page.locator('main .planted, main td img').count(), 0, 'no markup made');
      assert.equal(await page.evaluate(() => window.__pwned), undefined);
      const shownText = await el.innerText();
      assert.ok(shownText.startsWith('Push URL problem: <b class="planted">bold</b><img src=x onerror="window.__pwned=1"> '),
        shownText);
      assert.ok(!shownText.includes('\u202e') && !shownText.includes('\u0085'), 'the controls escaped: ' + shownText);
      assert.equal(await el.locator('bdi .ctl').count(), 2, 'each control marked');
    } finally {
      await page.unroute('**/admin/v1/peers', fake);
    }
    return problem;
  });

  await check('sign out', async () => {
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Admin token').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  });

  await check('a viewer sees no change controls on any page', async () => {
    await signIn(page, VIEWER, 'night-viewer', 'viewer');
    const seen = {};
    for (const [i, p] of PAGES.entries()) {
      await go(page, `#/${p}`);
      await buttonsMarked(page);
      const n = await page.locator('[data-change], form.change').count();
      assert.equal(n, 0, `change controls on ${p} for a viewer`);
      seen[p] = (await page.locator('main table tbody tr').count());
      await shot(page, `viewer-${String(i).padStart(2, '0')}-${p}`);
    }
    for (const hash of [`#/trace/${deadMsg}`, '#/held', '#/deadletters', `#/rooms/${group}`]) {
      await go(page, hash);
      assert.equal(await page.locator('[data-change]').count(), 0, `change controls on ${hash}`);
    }
    const held = await page.evaluate(() => fetch('/admin/v1/held', { headers: { Authorization: 'Bearer ' + sessionStorage.getItem('causeway.admin_token') } }).then((r) => r.status));
    assert.equal(held, 200, 'a viewer reads');
    const refused = await page.evaluate(() => fetch('/admin/v1/rules', {
      method: 'POST', headers: { Authorization: 'Bearer ' + sessionStorage.getItem('causeway.admin_token'), 'Content-Type': 'application/json' },
      body: JSON.stringify({ scope: 'domain', pattern: 'viewer.example', mode: 'deny' }),
    }).then((r) => r.status));
    assert.equal(refused, 403, 'the API refuses a viewer');
    return seen;
  });

  await check('a time is shown in the browser\'s zone, the zone named', async () => {
    // The API answers in UTC; a browser in New York shows the audit log's
    // times five hours earlier (four in summer), and says EST (EDT) (until the forty-seventh
    // session it said no zone: a bare local time read as the logs' UTC).
    const ny = await browser.newContext({ timezoneId: 'America/New_York', locale: 'en-US' });
    const p = current = watch(await ny.newPage(), 'new-york');
    try {
      await p.goto(BASE);
      await signIn(p, ADMIN, 'config', 'admin');
      await go(p, '#/audit');
      const t = p.locator('main td[data-label="At"] time').first();
      const iso = await t.getAttribute('datetime');
      const text = (await t.innerText()).trim();
      const utc = new Date(iso);
      assert.match(iso, /Z$|[+-]00:00$/, iso);
      const zone = text.match(/\b(EST|EDT)$/);
      assert.ok(zone, text);
      const hour = (utc.getUTCHours() + 24 - (zone[1] === 'EST' ? 5 : 4)) % 24;
      const h12 = String(hour % 12 === 0 ? 12 : hour % 12).padStart(2, '0');
      assert.ok(text.includes(`${h12}:${String(utc.getUTCMinutes()).padStart(2, '0')}:`), `${iso} shown as ${text}`);
      return { iso, text };
    } finally {
      current = page;
      await ny.close();
    }
  });

  await check('phone width: dashboard and navigation', async () => {
    const phone = await browser.newContext({ viewport: { width: 375, height: 700 }, isMobile: true, hasTouch: true });
    const p = current = watch(await phone.newPage(), 'phone');
    await p.goto(BASE);
    await signIn(p, ADMIN, 'config', 'admin');
    await p.locator('[data-stat="queue.held"]').waitFor({ timeout: WAIT });
    const width = await p.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 376, `no sideways scrolling (${width}px)`);
    assert.equal(await p.locator('#nav').isVisible(), false, 'the navigation is collapsed');
    await shot(p, 'phone-01-dashboard');
    await p.getByRole('button', { name: 'Menu' }).click();
    assert.equal(await p.getByRole('button', { name: 'Menu' }).getAttribute('aria-expanded'), 'true');
    await p.locator('#nav').getByRole('link', { name: 'Dead letters' }).waitFor({ state: 'visible' });
    await shot(p, 'phone-02-menu');
    await p.locator('#nav').getByRole('link', { name: 'Dead letters' }).click();
    await p.waitForFunction(() => location.hash === '#/deadletters');
    await settled(p);
    assert.equal(await p.locator('#nav').isVisible(), false, 'the menu closes after choosing');
    await shot(p, 'phone-03-deadletters');
    await go(p, `#/trace/${deadMsg}`);
    const w2 = await p.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(w2 <= 376, `trace fits (${w2}px)`);
    await shot(p, 'phone-04-trace');
    await phone.close();
  });

  await check('no CSP violation, console error or page error', async () => {
    assert.deepEqual(problems, []);
  });
} catch (e) {
  failed = true;
  if (!(e instanceof assert.AssertionError) && !/Timeout|waiting/i.test(e.message)) console.error(e);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
