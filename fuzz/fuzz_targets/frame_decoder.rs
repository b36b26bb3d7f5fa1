//! The frame decoder on arbitrary bytes cut at arbitrary points: it never panics, never takes
//! more than the frame limit, and whatever it decodes encodes back to a frame it decodes the
//! same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proto::{self, Control, FrameDecoder, RequestHead, ResponseHead};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);
    let mut decoder = FrameDecoder::new();
    for piece in bytes.chunks(cut) {
        decoder.push(piece);
        loop {
            match decoder.next::<serde_json::Value>() {
                Ok(Some(value)) => check_round_trip(&value),
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = decoder.finish();
    // The typed messages straight from the payload, as the edge and connector read them.
    let _ = proto::decode::<Control>(bytes);
    let _ = proto::decode::<ResponseHead>(bytes);
    if let Ok(head) = proto::decode::<RequestHead>(bytes) {
        let frame = proto::encode(&head).expect("a decoded head re-encodes");
        let again: RequestHead = proto::decode(&frame[4..]).expect("and decodes");
        assert_eq!(head, again);
    }
});

fn check_round_trip(value: &serde_json::Value) {
    if let Ok(frame) = proto::encode(value) {
        assert!(frame.len() <= proto::MAX_FRAME_LEN + 4);
        let mut d = FrameDecoder::new();
        d.push(&frame);
        let back: serde_json::Value = d.next().expect("valid").expect("complete");
        assert_eq!(&back, value);
        d.finish().expect("nothing left over");
    }
}
