//! The shared test vectors of tests/unit/vectors, written from the Python reference.

use std::path::PathBuf;

use jvpn_dataplane::channel::Channel;
use jvpn_dataplane::replay::{ReplayWindow, REPLAY_WINDOW};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/unit/vectors").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("vector file")).expect("json")
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn framing_vectors() {
    let v = load("dataplane_framing.json");
    let send: [u8; 32] = hex(&v["send_key"]).try_into().unwrap();
    let recv: [u8; 32] = hex(&v["recv_key"]).try_into().unwrap();
    let sid: [u8; 16] = hex(&v["session_id"]).try_into().unwrap();
    let epoch = v["epoch"].as_u64().unwrap() as u32;
    let mut tx = Channel::new(&send, &recv, sid, epoch).unwrap();
    let mut out = [0u8; 2048];
    for case in v["sealed"].as_array().unwrap() {
        let n = tx.seal_into(&hex(&case["inner"]), &mut out).unwrap();
        assert_eq!(out[..n], hex(&case["packet"])[..]);
    }
    let mut rx = Channel::new(&recv, &send, sid, epoch).unwrap();
    for step in v["receive"].as_array().unwrap() {
        let mut pkt = hex(&step["packet"]);
        let what = step["what"].as_str().unwrap();
        match rx.open_in_place(&mut pkt, true) {
            Ok(r) => assert_eq!(pkt[r], hex(&step["plain"])[..], "{what}"),
            Err(reason) => assert_eq!(Some(reason.code() as u64), step["code"].as_u64(), "{what}"),
        }
    }
}

#[test]
fn replay_vectors() {
    let v = load("replay_window.json");
    assert_eq!(v["window"].as_u64(), Some(REPLAY_WINDOW));
    let mut w = ReplayWindow::new();
    for step in v["steps"].as_array().unwrap() {
        let c: u64 = step["counter"].as_str().unwrap().parse().unwrap();
        assert_eq!(Some(w.check(c)), step["check"].as_bool(), "{c}");
        assert_eq!(Some(w.update(c)), step["update"].as_bool(), "{c}");
        let highest = step["highest"].as_str().map(|s| s.parse::<u64>().unwrap());
        assert_eq!(w.highest(), highest);
    }
}
