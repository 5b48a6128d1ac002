// Warden's kernel side (compiled by BCC). Small on purpose: match, record, rewrite.
// Every decision about what the connection may do stays in userspace.
//
// cgroup/connect4, cgroup/connect6: for every TCP connect from a governed cgroup,
//   capture who is connecting (tgid, uid, gid, cgroup, comm) keyed by socket cookie,
//   and when the destination is a governed target, rewrite it to the enforcer's
//   loopback listener (or leave it, for on_enforcer_down: bypass with no listener).
// sockops: once the source port is known (TCP_CONNECT_CB), re-key the capture by the
//   client's address and port, which is what the enforcer sees on accept(); report the
//   outcome of every connect (established or failed) for the inventory.
// cgroup/getpeername4|6: a redirected socket still reports the destination the workload
//   asked for, so the redirect stays invisible to it.
// cgroup/sock_release: forget captures of sockets that go away.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/tcp.h>
#include <linux/socket.h>

#define WD_SOCK_STREAM 1   // from linux/net.h, which BPF C cannot include

// BCC 0.26 declares bpf_get_socket_cookie as returning u32; the cookie is 64 bits.
static u64 (*wd_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#define FLAG_GOVERNED   1
#define FLAG_BYPASS     2
#define FLAG_REDIRECTED 4
#define FLAG_V4MAPPED   8

#define EV_ATTEMPT     1
#define EV_ESTABLISHED 2
#define EV_FAILED      3

#define ON_DOWN_REFUSE 0
#define ON_DOWN_BYPASS 1

#ifndef TCP_SYN_SENT_STATE
#define TCP_SYN_SENT_STATE 2
#define TCP_CLOSE_STATE    7
#endif

struct target_key {
    u32 prefixlen;      // 32 (port + pad) + 128 (address, IPv4 as ::ffff:a.b.c.d)
    u16 port;           // network order
    u16 pad;
    u32 addr[4];
};

struct target_val {
    u32 target_id;
    u16 listen_port;    // host order, on 127.0.0.1 / ::1 of the connecting netns
    u8 on_down;
    u8 pad;
};

struct conn_info {
    u64 cookie;
    u64 cgroup_id;
    u64 ts;
    u32 orig_addr[4];   // as the workload asked, IPv4 in mapped form
    u32 target_id;
    u32 tgid;
    u32 pid;
    u32 uid;
    u32 gid;
    u16 orig_port;      // host order
    u8 family;          // 4 or 6: the client socket's family
    u8 flags;
    char comm[16];
};

struct client_key {
    u32 addr[4];        // client's local address, IPv4 in mapped form
    u16 port;           // host order
    u16 pad;
};

struct orig_dst {
    u32 addr[4];        // as the workload asked (mapped form for IPv4)
    u32 port;           // network order, as bpf_sock_addr's user_port
};

struct conn_event {
    u32 kind;
    u32 pad;
    struct conn_info info;
};

BPF_LPM_TRIE(targets, struct target_key, struct target_val, 4096);
BPF_HASH(exempt_tgids, u32, u8, 1024);
BPF_HASH(exempt_cgroups, u64, u8, 64);
BPF_TABLE("lru_hash", u64, struct conn_info, pending, 65536);
BPF_TABLE("lru_hash", struct client_key, struct conn_info, redirected, 65536);
BPF_TABLE("lru_hash", u64, struct orig_dst, peer_names, 65536);
// 1 MiB: about 10,900 events, what the programs report while no agent reads (a restart)
BPF_RINGBUF_OUTPUT(events, 256);
// [0]: events the ring had no room for (no agent read it for a while, or one fell behind);
// [1]: how many of those an agent has recorded (written by the agent). A run that finds an
// earlier run's map records the difference, so a full ring is on record, never silent.
BPF_ARRAY(ring_drops, u64, 2);

static __always_inline int is_exempt(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (exempt_tgids.lookup(&tgid))
        return 1;
    u64 cg = bpf_get_current_cgroup_id();
    if (exempt_cgroups.lookup(&cg))
        return 1;
    return 0;
}

static __always_inline void fill_process(struct conn_info *info)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    info->tgid = pid_tgid >> 32;
    info->pid = (u32)pid_tgid;
    info->uid = (u32)uid_gid;
    info->gid = uid_gid >> 32;
    info->cgroup_id = bpf_get_current_cgroup_id();
    info->ts = bpf_ktime_get_ns();
    bpf_get_current_comm(&info->comm, sizeof(info->comm));
}

static __always_inline void report(u32 kind, struct conn_info *info)
{
    struct conn_event *ev = events.ringbuf_reserve(sizeof(struct conn_event));
    if (!ev) {
        u32 slot = 0;
        u64 *dropped = ring_drops.lookup(&slot);
        if (dropped)
            __sync_fetch_and_add(dropped, 1);
        return;
    }
    ev->kind = kind;
    ev->pad = 0;
    __builtin_memcpy(&ev->info, info, sizeof(*info));
    events.ringbuf_submit(ev, 0);
}

// Is the enforcer listening on 127.0.0.1:port in this netns?
static __always_inline int listener_up_v4(void *ctx, u16 port)
{
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = bpf_htonl(0x7f000001);
    tuple.ipv4.daddr = bpf_htonl(0x7f000001);
    tuple.ipv4.sport = 0;
    tuple.ipv4.dport = bpf_htons(port);
    struct bpf_sock *sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    bpf_sk_release(sk);
    return 1;
}

static __always_inline int listener_up_v6(void *ctx, u16 port)
{
    struct bpf_sock_tuple tuple = {};
    tuple.ipv6.saddr[3] = bpf_htonl(1);
    tuple.ipv6.daddr[3] = bpf_htonl(1);
    tuple.ipv6.sport = 0;
    tuple.ipv6.dport = bpf_htons(port);
    struct bpf_sock *sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    bpf_sk_release(sk);
    return 1;
}

int warden_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != WD_SOCK_STREAM || is_exempt())
        return 1;

    struct conn_info info = {};
    fill_process(&info);
    info.cookie = wd_socket_cookie(ctx);
    info.family = 4;
    info.orig_addr[2] = bpf_htonl(0xffff);
    info.orig_addr[3] = ctx->user_ip4;
    info.orig_port = bpf_ntohs((u16)ctx->user_port);

    struct target_key key = {};
    key.prefixlen = 160;
    key.port = (u16)ctx->user_port;
    key.addr[2] = bpf_htonl(0xffff);
    key.addr[3] = ctx->user_ip4;
    struct target_val *t = targets.lookup(&key);
    if (t) {
        info.flags |= FLAG_GOVERNED;
        info.target_id = t->target_id;
        if (t->on_down == ON_DOWN_BYPASS && !listener_up_v4(ctx, t->listen_port)) {
            info.flags |= FLAG_BYPASS;
        } else {
            // refuse mode with no listener: connecting to the dead port gives ECONNREFUSED
            struct orig_dst orig = {};
            orig.addr[2] = bpf_htonl(0xffff);
            orig.addr[3] = ctx->user_ip4;
            orig.port = ctx->user_port;
            peer_names.update(&info.cookie, &orig);
            ctx->user_ip4 = bpf_htonl(0x7f000001);
            ctx->user_port = bpf_htons(t->listen_port);
            info.flags |= FLAG_REDIRECTED;
        }
    }
    pending.update(&info.cookie, &info);
    report(EV_ATTEMPT, &info);
    return 1;
}

int warden_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != WD_SOCK_STREAM || is_exempt())
        return 1;

    struct conn_info info = {};
    fill_process(&info);
    info.cookie = wd_socket_cookie(ctx);
    info.family = 6;
    info.orig_addr[0] = ctx->user_ip6[0];
    info.orig_addr[1] = ctx->user_ip6[1];
    info.orig_addr[2] = ctx->user_ip6[2];
    info.orig_addr[3] = ctx->user_ip6[3];
    info.orig_port = bpf_ntohs((u16)ctx->user_port);
    int mapped = info.orig_addr[0] == 0 && info.orig_addr[1] == 0 &&
                 info.orig_addr[2] == bpf_htonl(0xffff);
    if (mapped)
        info.flags |= FLAG_V4MAPPED;

    struct target_key key = {};
    key.prefixlen = 160;
    key.port = (u16)ctx->user_port;
    key.addr[0] = info.orig_addr[0];
    key.addr[1] = info.orig_addr[1];
    key.addr[2] = info.orig_addr[2];
    key.addr[3] = info.orig_addr[3];
    struct target_val *t = targets.lookup(&key);
    if (t) {
        info.flags |= FLAG_GOVERNED;
        info.target_id = t->target_id;
        int up = mapped ? listener_up_v4(ctx, t->listen_port) : listener_up_v6(ctx, t->listen_port);
        if (t->on_down == ON_DOWN_BYPASS && !up) {
            info.flags |= FLAG_BYPASS;
        } else {
            struct orig_dst orig = {};
            orig.addr[0] = info.orig_addr[0];
            orig.addr[1] = info.orig_addr[1];
            orig.addr[2] = info.orig_addr[2];
            orig.addr[3] = info.orig_addr[3];
            orig.port = ctx->user_port;
            peer_names.update(&info.cookie, &orig);
            if (mapped) {
                ctx->user_ip6[0] = 0;
                ctx->user_ip6[1] = 0;
                ctx->user_ip6[2] = bpf_htonl(0xffff);
                ctx->user_ip6[3] = bpf_htonl(0x7f000001);
            } else {
                ctx->user_ip6[0] = 0;
                ctx->user_ip6[1] = 0;
                ctx->user_ip6[2] = 0;
                ctx->user_ip6[3] = bpf_htonl(1);
            }
            ctx->user_port = bpf_htons(t->listen_port);
            info.flags |= FLAG_REDIRECTED;
        }
    }
    pending.update(&info.cookie, &info);
    report(EV_ATTEMPT, &info);
    return 1;
}

int warden_sockops(struct bpf_sock_ops *skops)
{
    u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
        op != BPF_SOCK_OPS_STATE_CB)
        return 1;

    u64 cookie = wd_socket_cookie(skops);
    struct conn_info *info = pending.lookup(&cookie);
    if (!info)
        return 1;

    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        if (info->flags & FLAG_REDIRECTED) {
            // volatile reads: the verifier refuses ctx loads the compiler merges behind a branch
            u32 family = *(volatile u32 *)&skops->family;
            u32 ip4 = *(volatile u32 *)&skops->local_ip4;
            u32 ip6_0 = *(volatile u32 *)&skops->local_ip6[0];
            u32 ip6_1 = *(volatile u32 *)&skops->local_ip6[1];
            u32 ip6_2 = *(volatile u32 *)&skops->local_ip6[2];
            u32 ip6_3 = *(volatile u32 *)&skops->local_ip6[3];
            u32 lport = *(volatile u32 *)&skops->local_port;
            struct client_key key = {};
            if (family == AF_INET) {
                key.addr[2] = bpf_htonl(0xffff);
                key.addr[3] = ip4;
            } else {
                key.addr[0] = ip6_0;
                key.addr[1] = ip6_1;
                key.addr[2] = ip6_2;
                key.addr[3] = ip6_3;
            }
            key.port = (u16)lport;
            redirected.update(&key, info);
        }
        // follow state changes only until the handshake resolves
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }

    struct conn_info outcome = {};
    outcome.cookie = cookie;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(skops, 0);
        report(EV_ESTABLISHED, &outcome);
        pending.delete(&cookie);
    } else if (skops->args[0] == TCP_SYN_SENT_STATE && skops->args[1] == TCP_CLOSE_STATE) {
        report(EV_FAILED, &outcome);
        pending.delete(&cookie);
    }
    return 1;
}

int warden_peer4(struct bpf_sock_addr *ctx)
{
    u64 cookie = wd_socket_cookie(ctx);
    struct orig_dst *orig = peer_names.lookup(&cookie);
    if (orig) {
        ctx->user_ip4 = orig->addr[3];
        ctx->user_port = orig->port;
    }
    return 1;
}

int warden_peer6(struct bpf_sock_addr *ctx)
{
    u64 cookie = wd_socket_cookie(ctx);
    struct orig_dst *orig = peer_names.lookup(&cookie);
    if (orig) {
        ctx->user_ip6[0] = orig->addr[0];
        ctx->user_ip6[1] = orig->addr[1];
        ctx->user_ip6[2] = orig->addr[2];
        ctx->user_ip6[3] = orig->addr[3];
        ctx->user_port = orig->port;
    }
    return 1;
}

int warden_release(struct bpf_sock *sk)
{
    u64 cookie = wd_socket_cookie(sk);
    pending.delete(&cookie);
    peer_names.delete(&cookie);
    return 1;
}
