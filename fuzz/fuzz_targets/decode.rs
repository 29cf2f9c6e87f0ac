//! The packet decoder on arbitrary bytes, fed whole and split at a fuzzer-chosen point: it never
//! panics, never returns a frame longer than its input, and splitting never changes the result.
#![no_main]

use bytes::BytesMut;
use gearman_proto::{Codec, Frame};
use libfuzzer_sys::fuzz_target;

fn decode_all(codec: &Codec, chunks: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode_frame(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let codec = Codec {
        max_frame: 1 + (data[0] as usize) * 64,
        max_admin_line: 1 + (data[1] as usize) * 8,
    };
    let split = (data[2] as usize).min(data.len() - 3);
    let input = &data[3..];
    let (whole, whole_err) = decode_all(&codec, &[input]);
    let (parts, parts_err) = decode_all(&codec, &[&input[..split], &input[split..]]);
    // An error can be found earlier with less data (e.g. a bad magic prefix), so compare only
    // when neither run failed.
    if !whole_err && !parts_err {
        assert_eq!(whole, parts);
    }
    for f in &whole {
        if let Frame::Packet(p) = f {
            assert!(p.body_len() <= input.len());
            assert_eq!(p.args.len(), p.ptype.arg_count());
            // Re-encoding a decoded packet decodes to the same packet.
            let mut again = BytesMut::from(&p.to_bytes()[..]);
            let big = Codec::new(usize::MAX);
            assert_eq!(big.decode_frame(&mut again).unwrap(), Some(f.clone()));
        }
    }
});
