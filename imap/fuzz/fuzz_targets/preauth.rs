//! Everything the broker parses from a client before login, and both watches after it: no input
//! may panic, and each reader stays within its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_imap::command::{Event, Limits, Reader};
use postern_imap::{login, response, watch};

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the input is split, to exercise partial reads.
    let (split, data) = match data.split_first() {
        Some((&s, rest)) => (usize::from(s), rest),
        None => return,
    };
    let split = split.min(data.len());

    let limits = Limits { line: 256, literal: 256, command: 512 };
    let mut reader = Reader::new(limits);
    for piece in [&data[..split], &data[split..]] {
        reader.push(piece);
        while let Some(event) = reader.next_event() {
            match event {
                Event::Command(command) => {
                    if let postern_imap::command::Kind::Login { user, .. } = &command.kind {
                        let _ = login::Rules::default().canonical(user);
                    }
                    if let postern_imap::command::Kind::Authenticate { initial: Some(ir), .. } = &command.kind {
                        let _ = login::decode_plain(ir.expose());
                    }
                    reader.expect_sasl_response();
                }
                Event::Fatal(_) => break,
                _ => {}
            }
        }
    }

    let mut responses = response::Reader::default();
    responses.push(data);
    while let Ok(Some(r)) = responses.next_response() {
        let _ = response::rewrite_capabilities(&r.raw, |c| !watch::hidden(c));
    }

    let mut client = watch::Client::default();
    let mut server = watch::Server::default();
    let mut out = Vec::new();
    let mut forwarded = Vec::new();
    for piece in [&data[..split], &data[split..]] {
        let (taken, stop) = client.feed(piece, &mut forwarded);
        assert!(taken <= piece.len());
        if stop.is_some() {
            break;
        }
    }
    // The watch forwards a prefix of what it was given, never anything else.
    assert!(data.starts_with(&forwarded));
    for piece in [&data[..split], &data[split..]] {
        server.feed(piece, &mut out, &mut client);
    }
    assert!(out.len() <= data.len());
});
