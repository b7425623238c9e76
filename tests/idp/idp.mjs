#!/usr/bin/env node
// Postern test IdP: a real OpenID provider (npm `oidc-provider`) with the OAuth 2.0 device
// authorization grant (RFC 8628), a password -> TOTP login and auto-granted consent.
//
//   node tests/idp/idp.mjs CONFIG.json
//
// Prints exactly one JSON line on stdout once listening: {"issuer":"https://127.0.0.1:PORT","port":PORT}
// Everything else goes to stderr. See README.md for the CONFIG format.

import { readFileSync } from 'node:fs';
import { generateKeyPairSync, randomBytes, timingSafeEqual, createHash } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';

// oidc-provider prints its notices with console.info (stdout): stdout belongs to the harness.
console.log = console.error;
console.info = console.error;
console.debug = console.error;

const { default: Provider } = await import('oidc-provider');
const OTPAuth = await import('otpauth');

const log = (...args) => console.error(`[idp ${new Date().toISOString()}]`, ...args);

// ---------------------------------------------------------------- configuration

if (process.argv.length < 3) {
  console.error('usage: node idp.mjs CONFIG.json');
  process.exit(2);
}
const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));

const host = cfg.host ?? '127.0.0.1';
const listenPort = cfg.port ?? 0;
const positive = (v, dflt, name) => {
  if (v === undefined || v === null) return dflt;
  if (!Number.isInteger(v) || v <= 0) throw new TypeError(`${name} must be a positive integer`);
  return v;
};
const ttlDeviceCode = positive(cfg.device_code_ttl_seconds, 600, 'device_code_ttl_seconds');
const ttlIdToken = positive(cfg.id_token_ttl_seconds, 3600, 'id_token_ttl_seconds');
const ttlRefreshToken = positive(cfg.refresh_token_ttl_seconds, 86400, 'refresh_token_ttl_seconds');
const ttlAccessToken = positive(cfg.access_token_ttl_seconds, 600, 'access_token_ttl_seconds');

const ACR_MFA = 'urn:postern:test:mfa';
const ACR_PWD = 'urn:postern:test:pwd';

const users = new Map();
for (const u of cfg.users ?? []) {
  if (!u.username || typeof u.password !== 'string') throw new TypeError('each user needs username and password');
  users.set(u.username, {
    sub: u.sub ?? u.username,
    username: u.username,
    password: u.password,
    totp: u.totp_secret
      ? new OTPAuth.TOTP({
        secret: OTPAuth.Secret.fromBase32(u.totp_secret.replace(/[\s=]/g, '').toUpperCase()),
        algorithm: 'SHA1',
        digits: 6,
        period: 30,
      })
      : null,
    email: u.email,
    email_verified: u.email_verified ?? false,
    name: u.name,
    groups: u.groups ?? [],
  });
}
const usersBySub = new Map([...users.values()].map((u) => [u.sub, u]));

const clients = (cfg.clients ?? []).map((c) => {
  const base = {
    client_id: c.client_id,
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
    response_types: [],
    redirect_uris: [],
    id_token_signed_response_alg: 'RS256',
  };
  if (c.client_name) base.client_name = c.client_name;
  if (c.client_secret === null || c.client_secret === undefined) {
    return { ...base, token_endpoint_auth_method: 'none' };
  }
  return {
    ...base,
    client_secret: c.client_secret,
    // client_secret_post is accepted as well: see clientAuthMethods / the note in README.md
    token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
  };
});

// Signing keys, fresh at every start: RSA (RS256, used for ID tokens) and EC P-256 (ES256).
const rsaJwk = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
const ecJwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
const kid = (jwk) => createHash('sha256').update(JSON.stringify([jwk.kty, jwk.n ?? jwk.x, jwk.e ?? jwk.y])).digest('base64url').slice(0, 16);
const jwks = {
  keys: [
    { ...rsaJwk, kid: kid(rsaJwk), use: 'sig', alg: 'RS256' },
    { ...ecJwk, kid: kid(ecJwk), use: 'sig', alg: 'ES256' },
  ],
};

// ---------------------------------------------------------------- HTML (no external resources)

const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

const STYLE = 'body{font-family:sans-serif;max-width:26em;margin:2em auto;padding:0 1em}'
  + 'input{display:block;width:100%;box-sizing:border-box;margin:.3em 0 .8em;padding:.4em;font-size:1.1em}'
  + 'button{padding:.4em 1.2em;font-size:1em;margin-right:.5em}#error{color:#b00020}code{font-size:1.4em}';

function page(kind, title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>${STYLE}</style></head>
<body data-page="${kind}"><h1>${esc(title)}</h1>
${body}
</body></html>`;
}

const errorHtml = (msg, kind = 'error') => (msg ? `<p id="error" role="alert" data-kind="${esc(kind)}">${esc(msg)}</p>` : '');

// ---------------------------------------------------------------- device flow pages

async function userCodeInputSource(ctx, form, out, err) {
  let msg = '';
  let kind = '';
  if (err) {
    switch (err.name) {
      case 'NoCodeError': kind = 'no_code'; msg = 'Enter the code shown on your device.'; break;
      case 'NotFoundError': kind = 'not_found'; msg = 'The code you entered is incorrect. Try again.'; break;
      case 'ExpiredError': kind = 'expired'; msg = 'The code has expired. Start again on your device.'; break;
      case 'AlreadyUsedError': kind = 'already_used'; msg = 'The code has already been used.'; break;
      case 'AbortedError': kind = 'aborted'; msg = 'The sign-in request was aborted.'; break;
      default: kind = out?.error ?? 'error'; msg = `There was an error processing your request (${out?.error ?? err.name}).`;
    }
  }
  // The form brings the xsrf hidden field and one text input named user_code: give that input an
  // id (and nothing else: a second user_code field would make the POST invalid_request).
  const f = form.replace('name="user_code"', 'id="user_code" name="user_code" aria-label="Code"');
  ctx.type = 'html';
  ctx.body = page('device-input', 'Sign in a device', `${errorHtml(msg, kind)}
<p>Enter the code displayed on your device.</p>
${f}
<button type="submit" id="submit" form="op.deviceInputForm">Continue</button>`);
}

async function userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
  ctx.type = 'html';
  ctx.body = page('device-confirm', 'Confirm device', `<p>Application: <strong id="client">${esc(client.clientName || client.clientId)}</strong></p>
<p>Check that your device shows this code:</p>
<p><code id="code">${esc(userCode)}</code></p>
${form}
<button type="submit" id="confirm" form="op.deviceConfirmForm">Continue</button>
<button type="submit" id="abort" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
}

async function successSource(ctx) {
  ctx.type = 'html';
  ctx.body = page('done', 'Signed in', '<p id="done">You are signed in. You can close this page and return to your device.</p>');
}

async function renderError(ctx, out) {
  ctx.type = 'html';
  ctx.body = page('error', 'Error', errorHtml(`${out.error}${out.error_description ? `: ${out.error_description}` : ''}`, out.error));
}

async function logoutSource(ctx, form) {
  ctx.type = 'html';
  ctx.body = page('logout', 'Sign out', `${form}<button type="submit" id="submit" form="op.logoutForm" value="yes" name="logout">Sign out</button>`);
}

async function postLogoutSuccessSource(ctx) {
  ctx.type = 'html';
  ctx.body = page('logged-out', 'Signed out', '<p id="done">You are signed out.</p>');
}

// ---------------------------------------------------------------- provider

async function findAccount(ctx, sub) {
  const u = usersBySub.get(sub);
  if (!u) return undefined;
  return {
    accountId: u.sub,
    async claims() {
      return {
        sub: u.sub,
        email: u.email,
        email_verified: u.email_verified,
        name: u.name,
        preferred_username: u.username,
        groups: u.groups,
      };
    },
  };
}

const hostForUrl = host.includes(':') ? `[${host}]` : host;
const scheme = cfg.tls ? 'https' : 'http';

let handler = (req, res) => { res.statusCode = 503; res.end('starting\n'); };
const server = cfg.tls
  ? https.createServer({ cert: readFileSync(cfg.tls.cert), key: readFileSync(cfg.tls.key) }, (q, s) => handler(q, s))
  : http.createServer((q, s) => handler(q, s));

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(listenPort, host, resolve);
});
const { port } = server.address();
const issuer = `${scheme}://${hostForUrl}:${port}`;

const provider = new Provider(issuer, {
  clients,
  jwks,
  findAccount,
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    // acr/amr/auth_time are mapped to the openid scope so that they are always in the ID token
    // (oidc-provider only emits them when a scope or a claims request asks for them).
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username', 'groups'],
    groups: ['groups'],
    acr: null,
    amr: null,
    auth_time: null,
    sid: null,
    iss: null,
  },
  acrValues: [ACR_MFA, ACR_PWD],
  conformIdTokenClaims: false,
  clientAuthMethods: ['none', 'client_secret_basic', 'client_secret_post'],
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true, userCodeInputSource, userCodeConfirmSource, successSource,
    },
    revocation: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
    },
    introspection: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
    },
    userinfo: { enabled: true },
    rpInitiatedLogout: { enabled: true, logoutSource, postLogoutSuccessSource },
  },
  // Any client allowed the refresh_token grant gets a refresh token (the default wants the
  // offline_access scope too; the device flow keeps offline_access, so both agree for Postern).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  renderError,
  ttl: {
    AccessToken: ttlAccessToken,
    DeviceCode: ttlDeviceCode,
    IdToken: ttlIdToken,
    RefreshToken: ttlRefreshToken,
    Interaction: 3600,
    // the Grant and the Session must outlive the refresh token, or refresh fails early
    Grant: Math.max(ttlRefreshToken, 3600),
    Session: Math.max(ttlRefreshToken, 3600),
  },
  interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
});

provider.on('server_error', (ctx, err) => log('server_error', ctx?.path, err));
for (const ev of ['grant.error', 'device_authorization.error', 'introspection.error', 'revocation.error', 'userinfo.error']) {
  provider.on(ev, (ctx, err) => log(ev, err?.error ?? err?.name, err?.error_description ?? err?.message));
}
provider.on('grant.success', (ctx) => log('grant.success', ctx.oidc.params?.grant_type));

// ---------------------------------------------------------------- interaction (login, TOTP, consent)

// interaction uid -> { accountId, ts } once the password step passed and a TOTP is awaited
const pendingOtp = new Map();

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('content-type', 'text/html; charset=utf-8');
  res.setHeader('cache-control', 'no-store');
  res.end(html);
}

function redirect(res, location) {
  res.statusCode = 303;
  res.setHeader('location', location);
  res.end();
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(c);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function same(a, b) {
  const x = createHash('sha256').update(String(a)).digest();
  const y = createHash('sha256').update(String(b)).digest();
  return timingSafeEqual(x, y) && String(a) === String(b);
}

const loginPage = (uid, msg, username = '') => page('login', 'Sign in', `${errorHtml(msg)}
<form id="login" method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<label for="username">Username</label><input id="username" name="username" value="${esc(username)}" autofocus>
<label for="password">Password</label><input id="password" name="password" type="password">
<button type="submit" id="submit">Sign in</button>
</form>
<form method="post" action="/interaction/${esc(uid)}/abort"><button type="submit" id="cancel">Cancel</button></form>`);

const otpPage = (uid, msg) => page('otp', 'Two-factor authentication', `${errorHtml(msg)}
<form id="otp-form" method="post" action="/interaction/${esc(uid)}/otp" autocomplete="off">
<label for="otp">Six-digit code from your authenticator app</label>
<input id="otp" name="otp" inputmode="numeric" pattern="[0-9]{6}" maxlength="6" autofocus>
<button type="submit" id="submit">Verify</button>
</form>
<form method="post" action="/interaction/${esc(uid)}/abort"><button type="submit" id="cancel">Cancel</button></form>`);

async function finishLogin(req, res, uid, accountId, ts, mfa) {
  pendingOtp.delete(uid);
  log(`login ${accountId} amr=${mfa ? 'pwd,otp' : 'pwd'}`);
  await provider.interactionFinished(req, res, {
    login: {
      accountId,
      ts,
      amr: mfa ? ['pwd', 'otp'] : ['pwd'],
      acr: mfa ? ACR_MFA : ACR_PWD,
      remember: false,
    },
  }, { mergeWithLastSubmission: false });
}

async function autoConsent(req, res, details) {
  // First-party client: grant exactly what was asked for, without a page.
  const { prompt: { details: missing }, params, session: { accountId } } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  const prompt = details.prompt.name;

  if (action === 'abort' && req.method === 'POST') {
    pendingOtp.delete(uid);
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (prompt === 'consent') {
    await autoConsent(req, res, details);
    return;
  }
  if (prompt !== 'login') throw new Error(`unexpected prompt ${prompt}`);

  if (!action && req.method === 'GET') {
    send(res, 200, pendingOtp.has(uid) ? otpPage(uid) : loginPage(uid));
    return;
  }

  if (action === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    const u = users.get(username);
    if (!u || !same(form.get('password') ?? '', u.password)) {
      log(`login failed for ${JSON.stringify(username)}`);
      send(res, 200, loginPage(uid, 'Invalid username or password.', username));
      return;
    }
    const ts = Math.floor(Date.now() / 1000);
    if (!u.totp) {
      await finishLogin(req, res, uid, u.sub, ts, false);
      return;
    }
    pendingOtp.set(uid, { accountId: u.sub, ts });
    redirect(res, `/interaction/${uid}`);
    return;
  }

  if (action === 'otp' && req.method === 'POST') {
    const pending = pendingOtp.get(uid);
    if (!pending) { redirect(res, `/interaction/${uid}`); return; }
    const form = await readForm(req);
    const token = (form.get('otp') ?? '').replace(/\s/g, '');
    const u = usersBySub.get(pending.accountId);
    const delta = /^[0-9]{6}$/.test(token) ? u.totp.validate({ token, window: 1 }) : null;
    if (delta === null) {
      log(`totp failed for ${u.username}`);
      send(res, 200, otpPage(uid, 'Invalid code. Try again.'));
      return;
    }
    await finishLogin(req, res, uid, pending.accountId, pending.ts, true);
    return;
  }

  send(res, 405, page('error', 'Error', errorHtml('method not allowed')));
}

// ---------------------------------------------------------------- serve

const providerCallback = provider.callback();
const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|otp|abort))?\/?$/;

handler = (req, res) => {
  const started = Date.now();
  res.on('finish', () => log(`${req.method} ${req.url.split('?')[0]} ${res.statusCode} ${Date.now() - started}ms`));
  const { pathname } = new URL(req.url, issuer);
  const m = INTERACTION.exec(pathname);
  if (!m) { providerCallback(req, res); return; }
  interaction(req, res, m[1], m[2]).catch((err) => {
    log('interaction error', err?.name, err?.message);
    if (!res.headersSent) {
      send(res, 400, page('error', 'Error', errorHtml(`${err?.error ?? err?.name ?? 'error'}: ${err?.error_description ?? err?.message ?? ''}`, err?.error ?? 'error')));
    } else {
      res.end();
    }
  });
};

process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
log(`listening, issuer ${issuer}`);

let stopping = false;
function stop(sig) {
  if (stopping) return;
  stopping = true;
  log(`${sig}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
