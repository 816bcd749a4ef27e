// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * NetworkConnect: connect() on TCP and UDP sockets, and every datagram sent
 * to an explicit address (sendto/sendmsg without connect), IPv4, IPv6 and
 * IPv4-mapped IPv6. Addresses and ports stay in network byte order until
 * the lookup, which builds big-endian keys.
 *
 * Sockets no policy can name are refused at creation: packet and raw
 * sockets (they send to any address without connect or sendto ever naming
 * it), and families beyond inet, unix, netlink and the kernel's crypto
 * sockets (vsock, bluetooth, ...).
 *
 * Unix sockets: connecting or sending to one bound at a path is opening
 * that path for writing (FileOpenReadWrite), which is what the kernel asks
 * of the caller too. The path is the one the socket was bound at, walked
 * from its dentry, so a symlink, hard link or relative name the caller used
 * does not change it. A socket with an abstract name has no path: refused.
 * The leash daemon's own listening sockets (the MCP relay's) stay open.
 */
#include "lsm.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_UNSPEC 0
#define AF_ALG 38
#define MSG_FASTOPEN 0x20000000
#define SOCK_STREAM 1
#define SOCK_RAW 3
#define SOCK_PACKET 10
#define SOCK_TYPE_MASK 0xf
#define LEASH_WALK_DEPTH 64

static __always_inline int leash_net_check(struct socket *sock, struct sockaddr *address, int addrlen)
{
	struct leash_decision d = {};
	struct leash_config *cfg;
	__u16 sk_family, sa_family, port_be = 0;
	__u8 addr[16] = {};
	__u32 agent = leash_agent();

	if (!agent)
		return 0;
	sk_family = sock->sk->__sk_common.skc_family;
	if (sk_family == AF_UNIX || sk_family == AF_NETLINK)
		return 0;
	cfg = leash_cfg();
	if (!cfg)
		return -EPERM;
	d.agent = agent;
	d.generation = cfg->generation;
	d.action = LEASH_ACT_CONNECT;
	if (sk_family != AF_INET && sk_family != AF_INET6) {
		d.reason = LEASH_WHY_FAMILY;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	if (addrlen < (int)sizeof(sa_family))
		return 0;       /* the kernel refuses it with EINVAL */
	bpf_probe_read_kernel(&sa_family, sizeof(sa_family), &address->sa_family);
	if (sa_family == AF_UNSPEC)
		return 0;       /* dissolves a UDP association; reaches nobody */
	if (sa_family == AF_INET && addrlen >= (int)sizeof(struct sockaddr_in)) {
		struct sockaddr_in *sin = (struct sockaddr_in *)address;
		bpf_probe_read_kernel(&port_be, 2, &sin->sin_port);
		bpf_probe_read_kernel(addr, 4, &sin->sin_addr);
		d.denied = !leash_net_decide(&d, 4, addr, sock->sk->sk_protocol, bpf_ntohs(port_be));
	} else if (sa_family == AF_INET6 && addrlen >= (int)sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)address;
		bpf_probe_read_kernel(&port_be, 2, &sin6->sin6_port);
		bpf_probe_read_kernel(addr, 16, &sin6->sin6_addr);
		d.denied = !leash_net_decide(&d, 6, addr, sock->sk->sk_protocol, bpf_ntohs(port_be));
	} else {
		d.reason = LEASH_WHY_FAMILY;
		d.target = sa_family;
		d.denied = 1;
	}
	return leash_finish(&d, cfg);
}

SEC("lsm/socket_connect")
int BPF_PROG(leash_socket_connect, struct socket *sock, struct sockaddr *address, int addrlen)
{
	return leash_net_check(sock, address, addrlen);
}

SEC("lsm/socket_sendmsg")
int BPF_PROG(leash_socket_sendmsg, struct socket *sock, struct msghdr *msg, int size)
{
	struct sockaddr *name = msg->msg_name;

	/* No address: a connected socket, judged at connect(). TCP ignores an
	 * address except for a fast-open connect. */
	if (!name)
		return 0;
	if (sock->sk->sk_protocol == IPPROTO_TCP && sock->sk->sk_type == SOCK_STREAM &&
	    !(msg->msg_flags & MSG_FASTOPEN))
		return 0;
	return leash_net_check(sock, name, msg->msg_namelen);
}

SEC("lsm/socket_create")
int BPF_PROG(leash_socket_create, int family, int type, int protocol, int kern)
{
	struct leash_decision d = {
		.action = LEASH_ACT_CONNECT, .reason = LEASH_WHY_SOCKET, .target = family, .proto = protocol,
	};
	__u32 agent;

	if (kern)
		return 0;
	type &= SOCK_TYPE_MASK;
	if (family == AF_UNIX || family == AF_NETLINK || family == AF_ALG)
		return 0;
	if ((family == AF_INET || family == AF_INET6) && type != SOCK_RAW && type != SOCK_PACKET)
		return 0;
	agent = leash_agent();
	return agent ? leash_deny(agent, &d) : 0;
}

/*
 * The absolute path of a dentry on a mount, built backwards in s->walk up to
 * the root of the mount namespace, the way d_path does (bpf_d_path is not
 * allowed in the unix socket hooks): one bpf_loop step per component or
 * mount crossed, so the verifier checks the step once. Read without the
 * kernel's rename lock: a concurrent rename of a parent can give a stale
 * name, never an out-of-bounds one.
 */
struct leash_walk {
	struct dentry *dentry;
	struct mount *mnt;
	__u32 off;                      /* the path so far starts at s->walk[off] */
	int done;                       /* 1 at the namespace root, -1 failed */
};

static long leash_walk_step(__u32 i, void *ctx)
{
	struct leash_walk *w = ctx;
	struct leash_scratch *s = leash_scratch_get();
	struct dentry *dentry = w->dentry, *parent;
	struct mount *mnt = w->mnt, *up;
	const unsigned char *name;
	__u32 len, off = w->off;

	if (!s) {
		w->done = -1;
		return 1;
	}
	if (dentry == BPF_CORE_READ(mnt, mnt.mnt_root)) {
		up = BPF_CORE_READ(mnt, mnt_parent);
		if (up == mnt) {
			w->done = 1;
			return 1;
		}
		w->dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = up;
		return 0;
	}
	parent = BPF_CORE_READ(dentry, d_parent);
	len = BPF_CORE_READ(dentry, d_name.len);
	name = BPF_CORE_READ(dentry, d_name.name);
	/* a dentry that is its own parent but not its mount's root has been
	 * disconnected from it */
	if (dentry == parent || len > LEASH_NAME_MAX || len + 1 > off) {
		w->done = -1;
		return 1;
	}
	off -= len;
	bpf_probe_read_kernel(&s->walk[off & (LEASH_D_PATH_MAX - 1)], len & LEASH_NAME_MAX, name);
	off--;
	s->walk[off & (LEASH_D_PATH_MAX - 1)] = '/';
	w->off = off;
	w->dentry = parent;
	return 0;
}

/*
 * Returns the offset of the path in s->walk, or -1 when it is deeper than
 * LEASH_WALK_DEPTH components and mounts, longer than PATH_MAX, or no longer
 * connected to its mount's root.
 */
static __always_inline long leash_walk_path(struct leash_scratch *s, struct dentry *dentry,
					    struct vfsmount *vfsmnt)
{
	struct leash_walk w = {
		.dentry = dentry,
		.mnt = container_of(vfsmnt, struct mount, mnt),
		.off = LEASH_D_PATH_MAX - 1,
	};

	s->walk[LEASH_D_PATH_MAX - 1] = 0;
	bpf_loop(LEASH_WALK_DEPTH, leash_walk_step, &w, 0);
	if (w.done != 1)
		return -1;
	if (w.off == LEASH_D_PATH_MAX - 1) {
		/* the root itself */
		w.off--;
		s->walk[LEASH_D_PATH_MAX - 2] = '/';
	}
	return w.off;
}

/* Connecting or sending to the unix socket `other` (see the top of this file). */
static __always_inline int leash_unix_check(struct sock *other)
{
	struct leash_decision d = {};
	struct leash_config *cfg;
	struct leash_scratch *s;
	struct unix_sock *u;
	struct path_val *v;
	long off;
	__u32 agent;

	agent = leash_agent();
	if (!agent)
		return 0;
	cfg = leash_cfg();
	s = leash_scratch_get();
	u = bpf_skc_to_unix_sock(other);
	if (!cfg || !s || !u)
		return -EPERM;
	if (!u->addr)
		return 0;       /* unnamed: the other end of a socketpair */
	if (cfg->daemon_tgid && BPF_CORE_READ(other, sk_peer_pid, numbers[0].nr) == cfg->daemon_tgid)
		return 0;       /* listened on by the leash daemon itself */
	d.agent = agent;
	d.generation = cfg->generation;
	d.action = LEASH_ACT_WRITE;
	d.target = LEASH_VIA_UNIX;
	if (!u->path.dentry) {
		/* "@name" for the record; the name may hold NULs, it stops at one */
		s->walk[0] = '@';
		bpf_probe_read_kernel_str(&s->walk[1], LEASH_EVENT_PATH - 1, u->addr->name[0].sun_path + 1);
		d.path = s->walk;
		d.reason = LEASH_WHY_ABSTRACT;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	off = leash_walk_path(s, BPF_CORE_READ(u, path.dentry), BPF_CORE_READ(u, path.mnt));
	if (off < 0) {
		d.reason = LEASH_WHY_D_PATH;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	off &= LEASH_D_PATH_MAX - 1;
	leash_path_key(s, &s->walk[off], LEASH_D_PATH_MAX - off, &d);
	if (leash_foreign_mount(&u->path)) {
		d.reason = LEASH_WHY_MOUNT_NS;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	s->key.owner = 0;
	if (bpf_map_lookup_elem(&leash_protect, &s->key)) {
		d.reason = LEASH_WHY_PROTECTED;
		d.action = LEASH_ACT_SELF;
		d.always = 1;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	s->key.owner = leash_owner(d.generation, d.agent);
	v = bpf_map_lookup_elem(&leash_paths, &s->key);
	if (!v) {
		d.reason = LEASH_WHY_TABLE_MISS;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	d.class_id = v->class_id;
	d.denied = !(v->allow & ALLOW_WRITE_FILE);
	return leash_finish(&d, cfg);
}

/* connect() on stream and seqpacket sockets; `other` is the listener. */
SEC("lsm/unix_stream_connect")
int BPF_PROG(leash_unix_stream_connect, struct sock *sock, struct sock *other, struct sock *newsk)
{
	return leash_unix_check(other);
}

/* connect() on datagram sockets, and every datagram sent. */
SEC("lsm/unix_may_send")
int BPF_PROG(leash_unix_may_send, struct socket *sock, struct socket *other)
{
	return leash_unix_check(other->sk);
}
