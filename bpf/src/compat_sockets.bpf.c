// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Compat backend, sockets no policy can name. A packet socket (AF_PACKET,
 * root's CAP_NET_RAW) sends frames to any address without connect() or
 * sendto() ever naming it, so the sock_addr programs never see them; vsock,
 * bluetooth and the other families beyond inet reach peers leash cannot
 * judge. The cgroup sock_create program (compat_net.bpf.c) only sees inet
 * sockets, so a governed process asking for any other family but unix,
 * netlink and the kernel's crypto sockets is killed on its way back to
 * user space, before it can use the socket (the lsm backend refuses it).
 * Ungoverned processes pay a comparison per socket() call.
 */
#include "compat.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_ALG 38

/* The fields of tracepoint/syscalls/sys_enter_socket (its format file). */
struct compat_socket_args {
	__u64 common;
	__s32 nr;
	__s32 pad;
	__u64 family;
	__u64 type;
	__u64 protocol;
};

SEC("tracepoint/syscalls/sys_enter_socket")
int compat_socket(struct compat_socket_args *ctx)
{
	__u64 family = ctx->family;
	__u32 agent;

	if (family == AF_UNIX || family == AF_INET || family == AF_INET6 || family == AF_NETLINK ||
	    family == AF_ALG)
		return 0;
	agent = compat_agent();
	return agent ? compat_kill(agent, COMPAT_WHY_SOCKET, (__u32)family) : 0;
}
