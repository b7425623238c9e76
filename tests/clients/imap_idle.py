#!/usr/bin/env python3
"""Log in over implicit TLS with Python's imaplib, select INBOX and IDLE until the server (or
whatever is in between) ends the connection.

Prints `idling` once the server accepted IDLE, `exists: <n>` when the server announces new
mail, and `closed: <how>` when the connection ends.
The server's certificate is verified against --cafile.
"""
import argparse
import imaplib
import ssl
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args()

    context = ssl.create_default_context(cafile=args.cafile)
    imap = imaplib.IMAP4_SSL(args.host, args.port, ssl_context=context, timeout=600)
    imap.login(args.user, args.password)
    imap.select("INBOX")
    imap.send(b"I1 IDLE\r\n")
    continuation = imap.readline()
    if not continuation.startswith(b"+"):
        print(f"IDLE refused: {continuation!r}", flush=True)
        return 1
    print("idling", flush=True)
    try:
        while True:
            line = imap.readline()
            if not line:
                print("closed: end of stream", flush=True)
                return 0
            words = line.split()
            if len(words) == 3 and words[0] == b"*" and words[2].upper() == b"EXISTS":
                print(f"exists: {words[1].decode()}", flush=True)
                continue
            if line.startswith(b"* BYE"):
                print(f"closed: {line.decode(errors='replace').strip()}", flush=True)
                return 0
    except (OSError, imaplib.IMAP4.abort) as err:
        print(f"closed: {err}", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
