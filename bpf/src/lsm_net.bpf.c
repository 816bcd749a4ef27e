// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * NetworkConnect: connect() on TCP and UDP sockets, and every datagram sent
 * to an explicit address (sendto/sendmsg without connect), IPv4, IPv6 and
 * IPv4-mapped IPv6. Addresses and ports stay in network byte order until
 * the lookup, which builds big-endian keys.
 */
#include "leash.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_UNSPEC 0
#define MSG_FASTOPEN 0x20000000

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
	if (sock->sk->sk_protocol == IPPROTO_TCP && !(msg->msg_flags & MSG_FASTOPEN))
		return 0;
	return leash_net_check(sock, name, msg->msg_namelen);
}
