/* LD_PRELOAD shim for bench/speed.py's "original" row: TCP_NODELAY on every TCP socket the
 * process connects. The original migfra (libmosquitto 1.4) never sets it, so each QoS 1/2
 * exchange waits for the peer's delayed ACK (about 40 ms a task on Linux loopback); the
 * broker, the agent and the echoes all set it. Built by bench/original.py with
 * `cc -shared -fPIC -O2 -o nodelay.so nodelay.c -ldl`. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	static connect_fn next;
	if (!next)
		next = (connect_fn)dlsym(RTLD_NEXT, "connect");
	int rc = next(fd, addr, len);
	int saved = errno;
	if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
		int type = 0;
		socklen_t type_len = sizeof type;
		if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) == 0 && type == SOCK_STREAM) {
			int one = 1;
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		}
	}
	errno = saved;
	return rc;
}
