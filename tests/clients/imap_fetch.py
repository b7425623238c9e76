#!/usr/bin/env python3
"""Fetch a whole mailbox over implicit TLS with Python's imaplib and print what was seen as JSON.

Each message is reported by size and SHA-256, so two runs compare byte for byte. The server's
certificate is verified against --cafile and the address given (no verification is skipped).
"""
import argparse
import hashlib
import imaplib
import json
import ssl
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--mailbox", default="INBOX")
    parser.add_argument("--mechanism", choices=["login", "plain"], default="login",
                        help="LOGIN, or AUTHENTICATE PLAIN (without an initial response)")
    args = parser.parse_args()

    context = ssl.create_default_context(cafile=args.cafile)
    with imaplib.IMAP4_SSL(args.host, args.port, ssl_context=context, timeout=60) as imap:
        if args.mechanism == "plain":
            message = b"\0" + args.user.encode() + b"\0" + args.password.encode()
            imap.authenticate("PLAIN", lambda _challenge: message)
        else:
            imap.login(args.user, args.password)
        _, boxes = imap.list()
        _, count = imap.select(args.mailbox, readonly=True)
        _, found = imap.uid("SEARCH", None, "ALL")
        messages = []
        everything = hashlib.sha256()
        for uid in found[0].split():
            _, response = imap.uid("FETCH", uid, "(RFC822)")
            body = response[0][1]
            everything.update(body)
            messages.append({"uid": int(uid), "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        imap.logout()
    print(json.dumps({
        "mailboxes": [box.decode() for box in boxes],
        "exists": int(count[0]),
        "messages": messages,
        "sha256": everything.hexdigest(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
