#!/usr/bin/env python3
"""Seed mailboxes over implicit TLS with Python's imaplib, from a JSON spec.

The spec names the port, the CA file to verify the server (as `localhost`) against, and
sessions: each logs in and runs its steps in order, `["create", mailbox]`,
`["setacl", mailbox, who, rights]`, `["append", mailbox, file]` or `["deleteacl", mailbox, who]`.
Any refusal stops with the reason and a non-zero exit.
"""
import imaplib
import json
import ssl
import sys


def ok(answer, what):
    if answer[0] != "OK":
        sys.exit(f"{what}: {answer}")


def main() -> int:
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    context = ssl.create_default_context(cafile=spec["ca"])
    for session in spec["sessions"]:
        imap = imaplib.IMAP4_SSL("localhost", spec["port"], ssl_context=context)
        ok(imap.login(session["login"], session["password"]), "LOGIN " + session["login"])
        for step in session["steps"]:
            kind, mailbox, *rest = step
            if kind == "create":
                ok(imap.create(mailbox), "CREATE " + mailbox)
            elif kind == "setacl":
                ok(imap.setacl(mailbox, rest[0], rest[1]), "SETACL " + mailbox)
            elif kind == "append":
                with open(rest[0], "rb") as message:
                    ok(imap.append(mailbox, None, None, message.read()), "APPEND " + rest[0])
            elif kind == "deleteacl":
                ok(imap.deleteacl(mailbox, rest[0]), "DELETEACL " + mailbox)
            else:
                sys.exit(f"unknown step {step!r}")
        imap.logout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
