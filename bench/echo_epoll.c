/* The physical reference: a minimal in-loop echo server, one thread, one epoll set.
 *
 * TCP: accept (in a batch, until EAGAIN), read, write back, close on EOF. UDP: receive a
 * datagram, send it back. Nothing else: no logging, no limits, no fork. It shows what the
 * kernel and this machine allow, so a super-server's in-loop echo can be put against it.
 *
 *   echo_epoll TCP_PORT [UDP_PORT]      (TCP on 127.0.0.1, UDP on [::1]; stop with SIGTERM)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static int bound(int type, int port) {
    int v6 = type == SOCK_DGRAM, one = 1;  /* TCP on 127.0.0.1, UDP on [::1] (as the bench) */
    int fd = socket(v6 ? AF_INET6 : AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a6.sin6_addr = in6addr_loopback;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if ((v6 ? bind(fd, (struct sockaddr *)&a6, sizeof a6)
            : bind(fd, (struct sockaddr *)&a, sizeof a)) < 0) { perror("bind"); exit(1); }
    if (type == SOCK_STREAM && listen(fd, 1024) < 0) { perror("listen"); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: echo_epoll TCP_PORT [UDP_PORT]\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int lfd = bound(SOCK_STREAM, atoi(argv[1]));
    int ufd = argc > 2 ? bound(SOCK_DGRAM, atoi(argv[2])) : -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    if (ufd >= 0) {
        ev.data.fd = ufd;
        epoll_ctl(ep, EPOLL_CTL_ADD, ufd, &ev);
    }
    char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
            } else if (fd == ufd) {
                for (int k = 0; k < 256; k++) {
                    struct sockaddr_storage from;
                    socklen_t fl = sizeof from;
                    ssize_t r = recvfrom(ufd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
                    if (r < 0) break;
                    sendto(ufd, buf, r, 0, (struct sockaddr *)&from, fl);
                }
            } else {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) {
                    /* a short write would need a pending buffer; the bench's lines are small
                       enough to always fit an empty socket buffer, so a short write is fatal */
                    if (write(fd, buf, r) != r) close(fd);
                } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    close(fd);
                }
            }
        }
    }
}
