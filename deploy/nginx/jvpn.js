// Jumping VPN: session-affine routing key for nginx stream (njs >= 0.5.3).
//
// Theory of operation. Every Jumping VPN message starts with the same 20-byte
// cleartext header, version u8 | type u8 | flags u16 | session_id 16 bytes
// (session/wire.py); over TCP it follows a 2-byte length prefix. `preread`
// runs once per nginx flow (a UDP flow is every datagram from one client
// address:port until `proxy_timeout` of silence; a TCP flow is a connection),
// reads the header of the flow's first message and sets $jvpn_route, the key
// of `hash $jvpn_route consistent`:
//   - HANDSHAKE_INIT (type 1): its id field is a random handshake id, so the
//     key is the client's source address:port (source hash). A RETRY and the
//     repeated INIT travel in the same flow, so they reach the same node.
//   - any other type: "s" + the session id in hex, so every transport of one
//     session (new source port, NAT rebinding, UDP -> TCP) lands on the same
//     node while the node set is stable.
//   - too short to hold a header: the source address, like a handshake; the
//     node drops and counts it (jvpn_dropped_total), which keeps it visible.
// A consequence of flows: a datagram from an address:port whose flow is still
// open joins that flow, whatever its session id. So a NAT that hands one
// client's mapping to another within proxy_timeout sends the newcomer to the
// earlier client's node, until the flow idles out.
// Routing is an optimisation only: any node accepts any reattach (docs/ARCHITECTURE.md, Cluster).

var HEADER_LEN = 20;
var HANDSHAKE_INIT = 1;
var TCP_LENGTH_PREFIX = 2;

function sourceKey(s) {
    return 'a' + s.variables.remote_addr + ':' + s.variables.remote_port;
}

// The routing key for one message `buf` (a Buffer starting at the header).
function routeKey(s, buf, off) {
    if (buf.length < off + HEADER_LEN) {
        return sourceKey(s);
    }
    if (buf[off + 1] === HANDSHAKE_INIT) {
        return sourceKey(s);
    }
    return 's' + buf.slice(off + 4, off + HEADER_LEN).toString('hex');
}

function preread(s) {
    var tcp = s.variables.protocol === 'TCP';
    var off = tcp ? TCP_LENGTH_PREFIX : 0;
    // 'upstream' hands the data as a Buffer; in the preread phase it is called
    // with everything received so far until the handler says done.
    s.on('upstream', function (data, flags) {
        if (tcp && data.length < off + HEADER_LEN && !flags.last) {
            return;  // wait for the rest of the first frame (bounded by preread_timeout)
        }
        s.variables.jvpn_route = routeKey(s, data, off);
        s.off('upstream');
        s.done();
    });
}

export default { preread, routeKey };
