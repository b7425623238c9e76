#!/usr/bin/env node
// The test "person": approves (or denies) a device login in a real headless Chromium.
//
//   node tests/idp/approve.mjs --url VERIFICATION_URI --code USER_CODE --username U --password P
//        [--totp-secret BASE32] [--deny] [--timeout SECONDS] [--chromium PATH] [--screenshot FILE]
//
// Prints one JSON line on stdout: {"result":"approved"} | {"result":"denied"} |
// {"result":"error","message":"..."}. Exit code 0 only for approved, or denied with --deny.

import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';
import * as OTPAuth from 'otpauth';

const log = (...args) => console.error(`[approve ${new Date().toISOString()}]`, ...args);

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      url: { type: 'string' },
      code: { type: 'string' },
      username: { type: 'string' },
      password: { type: 'string' },
      'totp-secret': { type: 'string' },
      deny: { type: 'boolean', default: false },
      timeout: { type: 'string', default: '60' },
      chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
      screenshot: { type: 'string' },
    },
    strict: true,
  }));
  if (!opts.url) throw new Error('--url is required');
  if (!opts.deny && (opts.username === undefined || opts.password === undefined)) {
    throw new Error('--username and --password are required unless --deny');
  }
} catch (e) {
  process.stdout.write(`${JSON.stringify({ result: 'error', message: `usage: ${e.message}` })}\n`);
  process.exit(2);
}

const timeoutMs = Math.max(5, Number(opts.timeout) || 60) * 1000;
const deadline = Date.now() + timeoutMs;
const left = () => Math.max(1000, deadline - Date.now());
const sleep = (ms) => new Promise((r) => { setTimeout(r, ms); });

const totp = opts['totp-secret']
  ? new OTPAuth.TOTP({
    secret: OTPAuth.Secret.fromBase32(opts['totp-secret'].replace(/[\s=]/g, '').toUpperCase()),
    algorithm: 'SHA1',
    digits: 6,
    period: 30,
  })
  : null;

// A fresh code with at least ~4 s left in its 30 s window; never the one used before.
async function freshTotp(previous) {
  for (;;) {
    const now = Date.now();
    const remaining = 30_000 - (now % 30_000);
    const code = totp.generate({ timestamp: now });
    if (remaining >= 4_000 && code !== previous) return code;
    await sleep(remaining + 250);
  }
}

class Fail extends Error {}

let browser;
let page;

async function pageKind() {
  // every page of the IdP carries <body data-page="...">; a page without it (the provider's
  // auto-submitting form_post) is passed through by waiting for the next one
  await page.waitForSelector('body[data-page]', { timeout: left() });
  return page.getAttribute('body', 'data-page');
}

async function errorText() {
  const el = await page.$('#error');
  if (!el) return null;
  return { kind: await el.getAttribute('data-kind'), text: (await el.textContent()).trim() };
}

// Click and wait for the navigation (form POST, redirects) to finish loading.
async function clickAndWait(selector) {
  await Promise.all([
    page.waitForNavigation({ timeout: left(), waitUntil: 'load' }),
    page.click(selector, { timeout: left() }),
  ]);
}

async function run() {
  browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    timeout: left(),
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1',
    ],
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  page = await context.newPage();
  page.setDefaultTimeout(timeoutMs);

  log(`open ${opts.url}`);
  await page.goto(opts.url, { timeout: left(), waitUntil: 'load' });

  let codeSubmitted = false;
  let loginSubmitted = false;
  let lastOtp = null;
  let otpTries = 0;

  for (let step = 0; step < 20; step += 1) {
    const kind = await pageKind();
    const err = await errorText();
    log(`page ${kind}${err ? ` (error ${err.kind}: ${err.text})` : ''}`);

    switch (kind) {
      case 'device-input': {
        if (err && err.kind === 'aborted') {
          if (opts.deny) return { result: 'denied' };
          throw new Fail(`sign-in aborted: ${err.text}`);
        }
        if (codeSubmitted || err) throw new Fail(`user code rejected: ${err ? err.text : 'input page shown again'}`);
        if (!opts.code) throw new Fail('the page asks for a user code and --code was not given');
        await page.fill('#user_code', opts.code);
        codeSubmitted = true;
        await clickAndWait('#submit');
        break;
      }
      case 'device-confirm': {
        const shown = (await page.textContent('#code')).trim();
        if (opts.code && shown.replace(/[^A-Za-z0-9]/g, '').toUpperCase()
            !== opts.code.replace(/[^A-Za-z0-9]/g, '').toUpperCase()) {
          throw new Fail(`confirm page shows code ${shown}, expected ${opts.code}`);
        }
        codeSubmitted = true;
        await clickAndWait(opts.deny ? '#abort' : '#confirm');
        break;
      }
      case 'login': {
        if (loginSubmitted) throw new Fail(`login failed: ${err ? err.text : 'login page shown again'}`);
        if (opts.deny) throw new Fail('login page reached with --deny');
        await page.fill('#username', opts.username);
        await page.fill('#password', opts.password);
        loginSubmitted = true;
        await clickAndWait('#submit');
        break;
      }
      case 'otp': {
        if (!totp) throw new Fail('the IdP asks for a TOTP code and --totp-secret was not given');
        if (otpTries >= 2) throw new Fail(`TOTP rejected: ${err ? err.text : 'TOTP page shown again'}`);
        otpTries += 1;
        lastOtp = await freshTotp(lastOtp);
        await page.fill('#otp', lastOtp);
        await clickAndWait('#submit');
        break;
      }
      case 'done': {
        await page.waitForSelector('#done', { timeout: left() });
        if (opts.deny) throw new Fail('sign-in completed although --deny was given');
        return { result: 'approved' };
      }
      case 'error':
        throw new Fail(`IdP error page: ${err ? err.text : 'unknown error'}`);
      default:
        throw new Fail(`unexpected page ${kind}`);
    }
  }
  throw new Fail('too many steps');
}

let outcome;
let timer;
try {
  outcome = await Promise.race([
    run(),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Fail(`timed out after ${timeoutMs / 1000} s`)), timeoutMs + 2000);
    }),
  ]);
} catch (e) {
  outcome = { result: 'error', message: e instanceof Fail ? e.message : `${e.name}: ${e.message}`.split('\n')[0] };
  if (opts.screenshot && page) {
    await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: 5000 }).catch(() => {});
  }
} finally {
  clearTimeout(timer);
}
if (opts.screenshot && page && outcome.result !== 'error') {
  await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: 5000 }).catch(() => {});
}
await Promise.race([browser?.close().catch(() => {}), sleep(5000)]);

const ok = outcome.result === (opts.deny ? 'denied' : 'approved');
if (!ok && outcome.result !== 'error') {
  outcome = { result: 'error', message: `unexpected result ${outcome.result}` };
}
process.stdout.write(`${JSON.stringify(outcome)}\n`);
log(`result ${JSON.stringify(outcome)}`);
process.exit(ok ? 0 : 1);
