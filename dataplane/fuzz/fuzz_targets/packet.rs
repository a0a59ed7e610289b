//! Everything the data plane parses from the network, fed arbitrary bytes: the header,
//! the DATA prefix, a channel's open (replay window and AEAD, committing and not), and
//! the replay window driven by the input's counters. No input may panic; every refusal
//! is a DropReason; a refused packet never moves the window.
#![no_main]

use jvpn_dataplane::channel::Channel;
use jvpn_dataplane::replay::ReplayWindow;
use jvpn_dataplane::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::peek_header(data);
    let parsed = wire::parse_data(data);
    // A channel of the packet's own session and epoch, so the input reaches the replay
    // window and the AEAD instead of stopping at the session check.
    let (sid, epoch) = match parsed {
        Ok(h) => (h.session_id, h.epoch),
        Err(_) => ([0u8; 16], 0),
    };
    let mut ch = Channel::new(&[1; 32], &[2; 32], sid, epoch).expect("distinct keys");
    let mut buf = data.to_vec();
    let before = ch.highest_received();
    if let Err(_reason) = ch.open_in_place(&mut buf, false) {
        assert_eq!(buf, data, "a refused packet is left as it came");
    }
    assert_eq!(ch.highest_received(), before, "verification alone never moves the window");
    let opened = ch.open_in_place(&mut buf, true);
    if opened.is_err() {
        assert_eq!(ch.highest_received(), before, "a refused packet never moves the window");
    }

    // The input as counters: the window's answers stay consistent with each other.
    let mut w = ReplayWindow::new();
    let mut highest: Option<u64> = None;
    for chunk in data.chunks_exact(8) {
        let c = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let would = w.check(c);
        assert_eq!(w.update(c), would, "check answers what update does");
        assert!(!w.check(c), "a counter is accepted at most once");
        if would {
            highest = Some(highest.map_or(c, |h| h.max(c)));
        }
        assert_eq!(w.highest(), highest);
    }
});
