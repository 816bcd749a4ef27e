// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Compat backend, network side: NetworkConnect from cgroup sock_addr hooks
 * (connect4/6, and sendmsg4/6 for datagrams sent to an explicit address),
 * reading the same tables as lsm_net.bpf.c through leash_net_decide. Attached
 * at the root of the cgroup v2 hierarchy: scope is per thread (compat_tids),
 * so an agent that leaves its cgroup is still checked. sock_create refuses
 * inet sockets of other transports and raw sockets, which these hooks would
 * never see; compat_sockets.bpf.c deals with the other families.
 */
#include "compat.h"

char LICENSE[] SEC("license") = "GPL";

#define ALLOW 1
#define REFUSE 0
#define SOCK_STREAM 1
#define SOCK_DGRAM 2

static __always_inline int compat_net(struct bpf_sock_addr *ctx, __u8 family)
{
	struct leash_decision d = {};
	struct leash_config *cfg;
	__u8 addr[16] = {};
	__u32 agent = compat_agent();

	if (!agent)
		return ALLOW;
	cfg = leash_cfg();
	if (!cfg)
		return REFUSE;
	d.agent = agent;
	d.generation = cfg->generation;
	d.action = LEASH_ACT_CONNECT;
	if (family == 4) {
		__u32 ip = ctx->user_ip4;
		__builtin_memcpy(addr, &ip, 4);
	} else {
		__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
		__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
		__builtin_memcpy(addr, &w0, 4);
		__builtin_memcpy(addr + 4, &w1, 4);
		__builtin_memcpy(addr + 8, &w2, 4);
		__builtin_memcpy(addr + 12, &w3, 4);
	}
	d.denied = !leash_net_decide(&d, family, addr, ctx->protocol, bpf_ntohs(ctx->user_port));
	return leash_finish(&d, cfg) ? REFUSE : ALLOW;
}

SEC("cgroup/connect4")
int compat_connect4(struct bpf_sock_addr *ctx)
{
	return compat_net(ctx, 4);
}

SEC("cgroup/connect6")
int compat_connect6(struct bpf_sock_addr *ctx)
{
	return compat_net(ctx, 6);
}

SEC("cgroup/sendmsg4")
int compat_sendmsg4(struct bpf_sock_addr *ctx)
{
	return compat_net(ctx, 4);
}

SEC("cgroup/sendmsg6")
int compat_sendmsg6(struct bpf_sock_addr *ctx)
{
	return compat_net(ctx, 6);
}

SEC("cgroup/sock_create")
int compat_sock_create(struct bpf_sock *sk)
{
	struct leash_decision d = { .action = LEASH_ACT_CONNECT, .reason = LEASH_WHY_PROTOCOL };
	__u32 agent;

	/* A raw socket names TCP or UDP as its protocol too, and sends without
	 * reaching the sock_addr hooks. */
	if ((sk->protocol == IPPROTO_TCP && sk->type == SOCK_STREAM) ||
	    (sk->protocol == IPPROTO_UDP && sk->type == SOCK_DGRAM))
		return ALLOW;
	agent = compat_agent();
	if (!agent)
		return ALLOW;
	d.family = sk->family == AF_INET6 ? 6 : 4;
	d.proto = sk->protocol;
	return leash_deny(agent, &d) ? REFUSE : ALLOW;
}
