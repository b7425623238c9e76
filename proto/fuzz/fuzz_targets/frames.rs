//! Every decoder of `postern-proto` on arbitrary bytes: no panic, and whatever decodes
//! re-encodes to exactly the bytes it was read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::{Answer, Frame, Notice, Open, Reply, Request};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk() {
        let _ = Open::frame_len(header);
        let _ = Answer::frame_len(header);
        let _ = Notice::frame_len(header);
        let _ = Request::frame_len(header);
        let _ = Reply::frame_len(header);
    }
    if let Ok(Some((open, used))) = Open::decode(data) {
        assert_eq!(open.encode(), &data[..used]);
    }
    if let Ok(Some((answer, used))) = Answer::decode(data) {
        assert_eq!(answer.encode(), &data[..used]);
    }
    if let Ok(Some((notice, used))) = Notice::decode(data) {
        assert_eq!(notice.encode(), &data[..used]);
    }
    if let Ok(Some((request, used))) = Request::decode(data) {
        assert_eq!(request.encode(), &data[..used]);
    }
    if let Ok(Some((reply, used))) = Reply::decode(data) {
        assert_eq!(reply.encode(), &data[..used]);
    }
});
