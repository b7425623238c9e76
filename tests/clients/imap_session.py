#!/usr/bin/env python3
"""Hold one IMAP session open over implicit TLS (Python's imaplib) and fetch the whole mailbox
on request, so that a test can change the network under a session that stays the same.

Logs in, selects the mailbox read-only and prints `ready`. Then, for each line on standard input:
`fetch` fetches every message (UID FETCH BODY.PEEK[]) and prints one JSON line with each
message's UID, size and SHA-256; `noop` sends NOOP and prints `ok`; `logout` (or the end of
standard input) logs out and exits. Any failure ends the program with a non-zero exit code and
the reason on standard error. The server's certificate is verified against --cafile and the
address given (no verification is skipped).
"""
import argparse
import hashlib
import imaplib
import json
import ssl
import sys


def fetch_all(imap: imaplib.IMAP4_SSL) -> dict:
    status, found = imap.uid("SEARCH", None, "ALL")
    if status != "OK":
        raise RuntimeError(f"SEARCH failed: {found!r}")
    messages = []
    for uid in found[0].split():
        status, response = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        if status != "OK" or not response or not isinstance(response[0], tuple):
            raise RuntimeError(f"FETCH {uid!r} failed: {status} {response!r}")
        body = response[0][1]
        messages.append({
            "uid": int(uid),
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        })
    return {"messages": messages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--mailbox", default="INBOX")
    parser.add_argument("--timeout", type=float, default=60,
                        help="seconds any one read or write may take")
    args = parser.parse_args()

    context = ssl.create_default_context(cafile=args.cafile)
    imap = imaplib.IMAP4_SSL(args.host, args.port, ssl_context=context, timeout=args.timeout)
    imap.login(args.user, args.password)
    status, _ = imap.select(args.mailbox, readonly=True)
    if status != "OK":
        print(f"cannot select {args.mailbox}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "fetch":
            print(json.dumps(fetch_all(imap)), flush=True)
        elif command == "noop":
            imap.noop()
            print("ok", flush=True)
        elif command == "logout":
            break
        else:
            print(f"unknown command {command!r}", file=sys.stderr)
            return 2
    imap.logout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
