//! The frame decoder on arbitrary bytes cut at arbitrary points: it never panics, never takes
//! more than the frame limit, and every protocol message it decodes encodes back to a frame
//! that decodes to the same message; likewise for the binary request and response heads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proto::{self, Control, FrameDecoder, HeadCodec, RequestHead, ResponseHead};

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
    round_trip::<Control>(bytes);
    round_trip::<ResponseHead>(bytes);
    round_trip::<RequestHead>(bytes);
    // Binary heads, as a connection that negotiated them reads them.
    let binary = HeadCodec::Binary;
    let payload = bytes::Bytes::copy_from_slice(bytes);
    if let Ok(head) = binary.decode_request(&payload) {
        let frame = binary.encode_request(&head).expect("a decoded head re-encodes");
        assert_eq!(binary.decode_request(&frame.slice(4..)).expect("and decodes"), head);
    }
    if let Ok(head) = binary.decode_response(&payload) {
        let frame = binary.encode_response(&head).expect("a decoded head re-encodes");
        assert_eq!(binary.decode_response(&frame.slice(4..)).expect("and decodes"), head);
    }
});

/// Any JSON value re-encodes to one frame the decoder takes whole. (Values are not compared:
/// JSON numbers need not survive a float round trip, and no protocol message holds one.)
fn check_round_trip(value: &serde_json::Value) {
    if let Ok(frame) = proto::encode(value) {
        assert!(frame.len() <= proto::MAX_FRAME_LEN + 4);
        let mut d = FrameDecoder::new();
        d.push(&frame);
        let _: serde_json::Value = d.next().expect("valid").expect("complete");
        d.finish().expect("nothing left over");
    }
}

/// A message decoded from `payload` encodes to a frame that decodes to the same message.
fn round_trip<M>(payload: &[u8])
where
    M: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = proto::decode::<M>(payload) {
        let frame = proto::encode(&msg).expect("a decoded message re-encodes");
        let again: M = proto::decode(&frame[4..]).expect("and decodes");
        assert_eq!(msg, again);
    }
}
