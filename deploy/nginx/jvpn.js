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
//   - a REATTACH_REQUEST (type 5) with a route hint k > 0 in its flags (their
//     low byte; the client sets it when its usual node did not answer): not the
//     group but the k-th OTHER node, a fixed address in $jvpn_target (below,
//     "Route hints"), so the client reaches another node (paused, overloaded or
//     dead ones are not waited for), and hints 1, 2, ... cycle through the
//     others, then the usual node again. The key is then the session key + "/" + k (the access log shows
//     it). The flow it opens stays there.
//   - too short to hold a header: the source address, like a handshake; the
//     node drops and counts it (jvpn_dropped_total), which keeps it visible.
// A consequence of flows: a datagram from an address:port whose flow is still
// open joins that flow, whatever its session id. So a NAT that hands one
// client's mapping to another within proxy_timeout sends the newcomer to the
// earlier client's node, until the flow idles out.
// Routing is an optimisation only: any node accepts any reattach (docs/ARCHITECTURE.md, Cluster).

var HEADER_LEN = 20;
var HANDSHAKE_INIT = 1;
var REATTACH_REQUEST = 5;
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
    var key = 's' + buf.slice(off + 4, off + HEADER_LEN).toString('hex');
    var hint = routeHint(buf, off);  // the flags' low byte (big-endian u16 at offset 2)
    return hint > 0 ? key + '/' + hint : key;
}

// The route hint k of message `buf` (0: none, or not a REATTACH_REQUEST).
function routeHint(buf, off) {
    if (buf.length < off + HEADER_LEN || buf[off + 1] !== REATTACH_REQUEST || buf[off + 2] !== 0) {
        return 0;
    }
    return buf[off + 3];
}

// ---- Route hints: the k-th other node -------------------------------------------------------
//
// nginx's `hash ... consistent` places every server of a group on a ring of
// 32-bit points and sends a key to the server of the first point at or after
// crc32(key), walking on past the points of servers it cannot use (down,
// failed). A hint must reach a node that is NOT the usual one, and successive
// hints each of the others in turn, which no other point of that ring
// guarantees (each is the usual node again with probability 1/N). So for k > 0
// `preread` computes the same ring from the group's server list ($jvpn_nodes,
// rendered from the same list as the upstream block) and walks it from the
// session key's point: the distinct servers in the order met are
// [usual, other 1, other 2, ...], nginx's own failover order, and hint k goes
// to entry k mod N: hints 1..N-1 are the others, each once, hint N the usual
// node by address (so that two unanswering others do not keep a client from a
// usual node that answers again), then round again. A hint sent because the
// usual node is paused thus first reaches the node nginx itself would fail
// over to; hint 0 keeps the group, with nginx's passive health (a node it got
// errors from is skipped).
//
// nginx's ring (src/stream/ngx_stream_upstream_hash_module.c, init_chash): for
// a server written "host:port" (weight w, here always 1), base = crc32 state
// over host, one zero byte, port (a name ending in ":digits" splits there;
// "unix:path" has no port); its 160 * w points are p_j = crc32 final of base
// updated with the 4 bytes of p_(j-1) (little-endian: nginx writes them so on
// every machine; p_(-1) = 0); points sorted by value, of equal values only one
// kept. CRC-32 is the IEEE one (zlib's); njs has none.

var POINTS_PER_SERVER = 160;
var CRC_TABLE = (function () {
    var t = [];
    for (var n = 0; n < 256; n++) {
        var c = n;
        for (var b = 0; b < 8; b++) {
            c = (c & 1) ? (0xedb88320 ^ (c >>> 1)) : (c >>> 1);
        }
        t.push(c >>> 0);
    }
    return t;
})();

// The CRC-32 state `crc` (not final: start from 0xffffffff) after the bytes
// of `bytes` (an array of numbers, or a string of 8-bit characters).
function crcUpdate(crc, bytes) {
    var str = typeof bytes === 'string';
    for (var i = 0; i < bytes.length; i++) {
        var b = str ? bytes.charCodeAt(i) : bytes[i];
        crc = CRC_TABLE[(crc ^ b) & 0xff] ^ (crc >>> 8);
    }
    return crc >>> 0;
}

function crc32(text) {
    return (crcUpdate(0xffffffff, text) ^ 0xffffffff) >>> 0;
}

// [host, port] of a server name as nginx splits it for the ring.
function splitServer(name) {
    if (name.length >= 5 && name.slice(0, 5).toLowerCase() === 'unix:') {
        return [name.slice(5), ''];
    }
    var m = /^(.*):([0-9]*)$/.exec(name);
    return m ? [m[1], m[2]] : [name, ''];
}

// nginx's ring of `servers` (names as in the upstream block): sorted [point, name] pairs.
function ring(servers) {
    var points = [];
    for (var i = 0; i < servers.length; i++) {
        var hp = splitServer(servers[i]);
        var base = crcUpdate(crcUpdate(crcUpdate(0xffffffff, hp[0]), [0]), hp[1]);
        var prev = 0;
        for (var j = 0; j < POINTS_PER_SERVER; j++) {
            var p = (crcUpdate(base, [prev & 0xff, (prev >>> 8) & 0xff, (prev >>> 16) & 0xff,
                                      prev >>> 24]) ^ 0xffffffff) >>> 0;
            points.push([p, servers[i]]);
            prev = p;
        }
    }
    // Stable for equal points, so which one is kept may differ from nginx's qsort:
    // two servers on one 32-bit point is a ~1e-5 event, and routing is an optimisation.
    points.sort(function (a, b) { return a[0] - b[0]; });
    var kept = [];
    for (var k = 0; k < points.length; k++) {
        if (k === 0 || points[k][0] !== points[k - 1][0]) {
            kept.push(points[k]);
        }
    }
    return kept;
}

// The distinct servers in the order nginx's ring meets them from `key`'s point:
// [usual node, the one nginx fails over to, ...].
function nodeOrder(servers, key) {
    var points = ring(servers);
    var h = crc32(key);
    var lo = 0;
    var hi = points.length;
    while (lo < hi) {  // the first point >= h (points.length: wraps to 0)
        var mid = (lo + hi) >> 1;
        if (points[mid][0] < h) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    var order = [];
    var seen = {};
    for (var i = 0; i < points.length && order.length < servers.length; i++) {
        var name = points[(lo + i) % points.length][1];
        if (!seen[name]) {
            seen[name] = true;
            order.push(name);
        }
    }
    return order;
}

// The servers of a $jvpn_nodes value ("host:port host:port ...", commas also separate).
function nodeList(text) {
    var out = [];
    var seen = {};
    var parts = (text || '').split(/[\s,]+/);
    for (var i = 0; i < parts.length; i++) {
        if (parts[i] && !seen[parts[i]]) {
            seen[parts[i]] = true;
            out.push(parts[i]);
        }
    }
    return out;
}

// The node for route hint k > 0 of `key` among `servers`, or null (fewer than two).
function hintNode(servers, key, k) {
    if (servers.length < 2 || k < 1) {
        return null;
    }
    var order = nodeOrder(servers, key);
    return order[k % order.length];
}

// [proxy_pass target, hash key] for message `buf` of a flow on group `group`
// whose servers are `nodes` (the $jvpn_nodes text).
function route(s, buf, off, group, nodes) {
    var key = routeKey(s, buf, off);
    var k = routeHint(buf, off);
    var node = k > 0 ? hintNode(nodeList(nodes), key.slice(0, key.indexOf('/')), k) : null;
    return [node === null ? group : node, key];
}

function preread(s) {
    var tcp = s.variables.protocol === 'TCP';
    var off = tcp ? TCP_LENGTH_PREFIX : 0;
    var group = tcp ? 'jvpn_gateways_tcp' : 'jvpn_gateways_udp';
    // 'upstream' hands the data as a Buffer; in the preread phase it is called
    // with everything received so far until the handler says done.
    s.on('upstream', function (data, flags) {
        if (tcp && data.length < off + HEADER_LEN && !flags.last) {
            return;  // wait for the rest of the first frame (bounded by preread_timeout)
        }
        var r = route(s, data, off, group, s.variables.jvpn_nodes);
        s.variables.jvpn_target = r[0];
        s.variables.jvpn_route = r[1];
        s.off('upstream');
        s.done();
    });
}

// ---- the client's address on every datagram (deploy/README.md, "The client's address") ----
//
// nginx's UDP proxy sends to a gateway from its own socket, so without help the
// gateway sees one source for every client. PROXY protocol is no answer for UDP
// (nginx writes at most a v1 header on a flow's first datagram), so `filter`
// (js_filter) puts a fixed 24-byte prefix before EVERY client -> gateway datagram:
//   magic "JVPA" | family u8 (4 or 6) | reserved u8 (0) | client port u16 BE |
//   client address, 16 bytes (IPv4: 4 bytes, then 12 zero bytes)
// (gateway/balancer.py parses it). A gateway accepts the prefix only from the
// addresses in its `trusted_balancers`, strips it and answers to nginx's socket
// as before; gateway -> client datagrams are passed unchanged. The prefix is
// computed once per flow (a flow has one client address:port).

var PREFIX_LEN = 24;
var PREFIX_MAGIC = [0x4a, 0x56, 0x50, 0x41];  // "JVPA"

function ipv4Bytes(text, out, at) {
    var parts = text.split('.');
    if (parts.length !== 4) {
        return false;
    }
    for (var i = 0; i < 4; i++) {
        if (!/^[0-9]{1,3}$/.test(parts[i]) || Number(parts[i]) > 255) {
            return false;
        }
        out[at + i] = Number(parts[i]);
    }
    return true;
}

function ipv6Bytes(text, out, at) {
    var head = text;
    var tail = '';
    var gap = text.indexOf('::');
    if (gap >= 0) {
        head = text.slice(0, gap);
        tail = text.slice(gap + 2);
    }
    var words;
    var groups = [head ? head.split(':') : [], tail ? tail.split(':') : []];
    var parsed = [[], []];
    for (var g = 0; g < 2; g++) {
        var list = groups[g];
        for (var i = 0; i < list.length; i++) {
            var w = list[i];
            var last = (gap < 0 ? g === 0 : g === 1) && i === list.length - 1;
            if (last && w.indexOf('.') >= 0) {  // ::ffff:1.2.3.4
                var v4 = [0, 0, 0, 0];
                if (!ipv4Bytes(w, v4, 0)) {
                    return false;
                }
                parsed[g].push(v4[0] * 256 + v4[1], v4[2] * 256 + v4[3]);
            } else if (/^[0-9a-fA-F]{1,4}$/.test(w)) {
                parsed[g].push(parseInt(w, 16));
            } else {
                return false;
            }
        }
    }
    var fill = 8 - parsed[0].length - parsed[1].length;
    if ((gap >= 0 && fill < 1) || (gap < 0 && fill !== 0)) {
        return false;
    }
    words = parsed[0];
    for (var k = 0; k < fill; k++) {
        words.push(0);
    }
    words = words.concat(parsed[1]);
    for (var j = 0; j < 8; j++) {
        out[at + 2 * j] = words[j] >> 8;
        out[at + 2 * j + 1] = words[j] & 0xff;
    }
    return true;
}

// The prefix for a client at `addr` (text, as $remote_addr) and `port`; null if unparsable.
function addressPrefix(addr, port) {
    var buf = Buffer.alloc(PREFIX_LEN);
    for (var i = 0; i < 4; i++) {
        buf[i] = PREFIX_MAGIC[i];
    }
    var ok;
    if (addr.indexOf(':') >= 0) {
        buf[4] = 6;
        ok = ipv6Bytes(addr, buf, 8);
    } else {
        buf[4] = 4;
        ok = ipv4Bytes(addr, buf, 8);
    }
    var p = Number(port);
    if (!ok || !(p >= 0 && p <= 65535)) {
        return null;
    }
    buf[6] = p >> 8;
    buf[7] = p & 0xff;
    return buf;
}

function filter(s) {
    if (s.variables.protocol !== 'UDP') {
        return;  // TCP carries the address by PROXY protocol (proxy_protocol on)
    }
    var prefix = addressPrefix(s.variables.remote_addr, s.variables.remote_port);
    if (prefix === null) {
        s.error('jvpn: cannot encode client address ' + s.variables.remote_addr);
    }
    // Each call is one client datagram (a UDP read is one buffer): one prefixed
    // datagram goes on, never split, never merged. Without a prefix (unencodable
    // address) the datagram goes on bare and the gateway drops and counts it.
    s.on('upstream', function (data, flags) {
        s.send(prefix === null ? data : Buffer.concat([prefix, data]), flags);
    });
}

// ---- QUIC (gateway/quic.py) ----------------------------------------------------------------
//
// Every connection ID a gateway chooses is 8 bytes, 0x07 | server id u16 BE | 5 random
// bytes (QUIC-LB plaintext: config rotation 0, length 7). `quicPreread` reads the first
// datagram of a flow: if its destination connection ID (short header: right after the
// first byte; long header: after the version and its length byte) is one of those and
// $jvpn_quic_nodes names the node with that server id, the flow goes to that node (a
// NAT rebinding of a live connection, a client's Handshake packets, the Initial after
// a Retry); otherwise (a new connection's Initial: a client-chosen ID, or a node that
// is not listed) to the jvpn_gateways_quic group, hashed by that ID (by the source
// address for what is too short to hold one).

var QUIC_CID_LEN = 8;
var QUIC_CID_FIRST = 0x07;
var QUIC_GROUP = 'jvpn_gateways_quic';

// The QUIC destination connection ID of datagram `buf`, or null.
function quicDcid(buf) {
    if (buf.length < 1) {
        return null;
    }
    if (buf[0] & 0x80) {  // long header: flags, version 4, dcid length, dcid
        if (buf.length < 6 || buf[5] < 1 || buf[5] > 20 || buf.length < 6 + buf[5]) {
            return null;
        }
        return buf.slice(6, 6 + buf[5]);
    }
    if (buf.length < 1 + QUIC_CID_LEN) {
        return null;
    }
    return buf.slice(1, 1 + QUIC_CID_LEN);
}

// The server id a connection ID of ours carries, or -1.
function quicServerId(cid) {
    if (cid === null || cid.length !== QUIC_CID_LEN || cid[0] !== QUIC_CID_FIRST) {
        return -1;
    }
    return cid[1] * 256 + cid[2];
}

// "id=host:port,..." -> the address of server id `sid`, or null.
function quicNode(nodes, sid) {
    var list = nodes ? nodes.split(',') : [];
    for (var i = 0; i < list.length; i++) {
        var eq = list[i].indexOf('=');
        if (eq > 0 && Number(list[i].slice(0, eq)) === sid) {
            return list[i].slice(eq + 1);
        }
    }
    return null;
}

// [proxy_pass target, hash key] for the first datagram `buf` of a QUIC flow.
function quicRoute(s, buf, nodes) {
    var cid = quicDcid(buf);
    var sid = quicServerId(cid);
    var node = sid >= 0 ? quicNode(nodes, sid) : null;
    if (node !== null) {
        return [node, 'n' + sid];
    }
    return [QUIC_GROUP, cid === null ? sourceKey(s) : 'q' + cid.toString('hex')];
}

function quicPreread(s) {
    s.on('upstream', function (data, flags) {
        var r = quicRoute(s, data, s.variables.jvpn_quic_nodes);
        s.variables.jvpn_quic_target = r[0];
        s.variables.jvpn_route = r[1];
        s.off('upstream');
        s.done();
    });
}

export default { preread, routeKey, route, nodeOrder, filter, addressPrefix, quicPreread, quicRoute };
