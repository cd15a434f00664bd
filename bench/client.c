/* The bench's load generator: many short TCP connections, or UDP request/reply pairs.
 *
 * TCP, per connection: connect, send one line, shutdown(SHUT_WR), read until EOF, check that
 * the bytes read are the bytes sent, close (a normal close: no SO_LINGER). The latency of a
 * connection is from just before connect() to EOF. UDP: N datagrams outstanding, each tagged
 * with its slot and sequence number; a slot whose reply came back (or timed out, counted as a
 * loss) sends the next one. Sends go out in one sendmmsg, replies come in with recvmmsg.
 *
 * Concurrency N: N connections (or N outstanding datagrams) kept in flight at all times by
 * T threads, each running an edge-triggered epoll loop over its share (TCP). Source addresses are
 * rotated over 127.0.0.1..127.0.0.S (IP_BIND_ADDRESS_NO_PORT) so the client-side TIME_WAIT
 * sockets of a long run do not use up the ephemeral ports of one address pair.
 *
 * Measured window: completions ending between warm-up and warm-up + duration; or, with -n,
 * the first N completions (no warm-up). Every run is bounded by -T seconds. Prints one JSON
 * object on stdout.
 *
 * With -k the client does not half-close: it reads its line back and closes (for servers
 * that end a connection at the client's end-of-file, as systemd-socket-proxyd does).
 *
 *   client -p PORT [-h 127.0.0.1 | ::1] [-u] [-c 8] [-t 1] [-d 2] [-w 0.3] [-n COUNT] [-T 60]
 *          [-s 64] [-S 8] [-o TIMEOUT_MS] [-k]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { IDLE, CONNECTING, READING, WAITING };
enum { E_CONNECT, E_REFUSED, E_RESET, E_ADDR, E_MISMATCH, E_TIMEOUT, E_OTHER, E_STALE, E_N };
static const char *ERR_NAMES[E_N] = {"connect", "refused", "reset", "addrnotavail",
                                     "mismatch", "timeout", "other", "stale_reply"};

struct slot {
    int fd, state, src;
    double started, deadline;
    size_t got;
    uint32_t seq;
};

struct worker {
    pthread_t thread;
    int id, nslots;
    struct slot *slots;
    uint32_t *lat;          /* latencies (us) of measured completions */
    size_t nlat, cap;
    uint64_t done_total, measured, sent, received;
    uint64_t errors[E_N];
};

static struct {
    struct sockaddr_storage dst;
    socklen_t dstlen;
    int v6;
    int udp, conc, threads, nsrc, size, keep_open;
    double duration, warmup, hardlimit, timeout;
    long count;
    double t0, t_measure, t_end;
    char *msg;
} cfg;

static atomic_long completed_in_count;  /* -n mode: completions claimed so far */
static atomic_int stop_flag;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void record(struct worker *w, double started, double ended) {
    w->done_total++;
    int measured;
    if (cfg.count > 0) {
        long n = atomic_fetch_add(&completed_in_count, 1) + 1;
        measured = n <= cfg.count;
        if (n >= cfg.count) atomic_store(&stop_flag, 1);
    } else {
        measured = ended >= cfg.t_measure && ended <= cfg.t_end;
    }
    if (!measured) return;
    w->measured++;
    if (w->nlat == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 65536;
        w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
        if (!w->lat) { perror("realloc"); exit(3); }
    }
    double us = (ended - started) * 1e6;
    w->lat[w->nlat++] = us > 4e9 ? 4000000000u : (uint32_t)us;
}

static int err_kind(int e) {
    switch (e) {
    case ECONNREFUSED: return E_REFUSED;
    case ECONNRESET: case EPIPE: return E_RESET;
    case EADDRNOTAVAIL: case EADDRINUSE: return E_ADDR;
    default: return E_OTHER;
    }
}

static int running(void) {
    return !atomic_load(&stop_flag) && now() < cfg.t_end;
}

static void bind_source(int fd, int src) {
    if (cfg.v6 || cfg.nsrc == 1) return;  /* ::1 is the only IPv6 loopback address */
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)src);
    int one = 1;
    if (!cfg.udp)
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    bind(fd, (struct sockaddr *)&a, sizeof a);  /* best effort: fall back to the kernel's pick */
}

static void finish(struct worker *w, int ep, struct slot *s) {
    (void)w; (void)ep;
    close(s->fd);
    s->fd = -1;
    s->state = IDLE;
}

static void fail(struct worker *w, int ep, struct slot *s, int kind) {
    w->errors[kind]++;
    finish(w, ep, s);
}

/* ---- TCP -------------------------------------------------------------------------------- */

static void tcp_send(struct worker *w, int ep, struct slot *s) {
    ssize_t n = send(s->fd, cfg.msg, cfg.size, MSG_NOSIGNAL);
    if (n != cfg.size) {
        if (n < 0 && (errno == EAGAIN || errno == ENOTCONN)) return;  /* not connected yet */
        fail(w, ep, s, n < 0 ? err_kind(errno) : E_OTHER);
        return;
    }
    if (!cfg.keep_open) shutdown(s->fd, SHUT_WR);
    s->state = READING;
    s->got = 0;
}

static void tcp_read(struct worker *w, int ep, struct slot *s) {
    char buf[4096];
    for (;;) {
        ssize_t n = recv(s->fd, buf, sizeof buf, 0);
        if (n > 0) {
            s->got += n;
            if (cfg.keep_open && s->got >= (size_t)cfg.size) n = 0;  /* the line is back */
            else continue;
        }
        if (n == 0) {
            double t = now();
            if (s->got != (size_t)cfg.size) fail(w, ep, s, E_MISMATCH);
            else { record(w, s->started, t); finish(w, ep, s); }
            return;
        }
        if (errno == EAGAIN || errno == EINTR) return;
        fail(w, ep, s, err_kind(errno));
        return;
    }
}

static void tcp_start(struct worker *w, int ep, struct slot *s) {
    int fd = socket(cfg.dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { w->errors[E_OTHER]++; return; }
    s->src = (s->src + 1) % cfg.nsrc;
    bind_source(fd, s->src);
    s->fd = fd;
    s->started = now();
    s->deadline = s->started + cfg.timeout;
    s->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.ptr = s};
    if (connect(fd, (struct sockaddr *)&cfg.dst, cfg.dstlen) < 0 && errno != EINPROGRESS) {
        fail(w, ep, s, errno == EADDRNOTAVAIL ? E_ADDR : err_kind(errno));
        return;
    }
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void tcp_event(struct worker *w, int ep, struct slot *s, uint32_t events) {
    if (s->state == CONNECTING) {
        if (events & (EPOLLERR | EPOLLHUP)) {
            int e = 0;
            socklen_t l = sizeof e;
            getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &e, &l);
            fail(w, ep, s, e ? err_kind(e) : E_CONNECT);
            return;
        }
        if (events & EPOLLOUT) tcp_send(w, ep, s);
    }
    if (s->state == READING && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        tcp_read(w, ep, s);
}

/* ---- UDP -------------------------------------------------------------------------------- */

/* One socket per thread, every datagram tagged with its slot and sequence number; the slots
 * that are free are sent in one sendmmsg, and replies are read in batches with recvmmsg, so the
 * client spends little more than the kernel's own cost per datagram. */
#define RBATCH 256

static void udp_loop(struct worker *w) {
    int fd = socket(cfg.dst.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("udp socket"); exit(3); }
    bind_source(fd, w->id % cfg.nsrc);
    if (connect(fd, (struct sockaddr *)&cfg.dst, cfg.dstlen) < 0) { perror("connect"); exit(3); }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 2000};  /* recvmmsg wakes up for the timeouts */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    int n = w->nslots;
    char *sbuf = malloc((size_t)n * cfg.size), *rbuf = malloc((size_t)RBATCH * 2048);
    struct mmsghdr *smsg = calloc(n, sizeof *smsg), rmsg[RBATCH];
    struct iovec *siov = calloc(n, sizeof *siov), riov[RBATCH];
    int *which = calloc(n, sizeof *which);
    memset(rmsg, 0, sizeof rmsg);
    for (int i = 0; i < RBATCH; i++) {
        riov[i].iov_base = rbuf + (size_t)i * 2048;
        riov[i].iov_len = 2048;
        rmsg[i].msg_hdr.msg_iov = &riov[i];
        rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    double last_scan = 0;
    for (;;) {
        int run = running(), k = 0, busy = 0;
        double t = now();
        for (int i = 0; i < n && run; i++) {
            struct slot *s = &w->slots[i];
            if (s->state != IDLE) continue;
            char *b = sbuf + (size_t)k * cfg.size;
            uint16_t idx = (uint16_t)i;
            s->seq++;
            memcpy(b, cfg.msg, cfg.size);
            memcpy(b, &s->seq, sizeof s->seq);  /* a late reply to an earlier one is told apart */
            memcpy(b + 4, &idx, sizeof idx);
            siov[k].iov_base = b;
            siov[k].iov_len = cfg.size;
            smsg[k].msg_hdr.msg_iov = &siov[k];
            smsg[k].msg_hdr.msg_iovlen = 1;
            s->started = t;
            s->deadline = t + cfg.timeout;
            s->state = WAITING;
            which[k++] = i;
        }
        if (k) {
            int sent = sendmmsg(fd, smsg, k, 0);
            if (sent < 0) { w->errors[err_kind(errno)]++; sent = 0; }
            w->sent += sent;
            for (int j = sent; j < k; j++) w->slots[which[j]].state = IDLE;  /* next turn */
        }
        for (int i = 0; i < n; i++) busy += w->slots[i].state != IDLE;
        if (!busy && !run) break;
        if (!run && t > cfg.t_end + cfg.timeout) break;  /* drain, bounded */
        if (t > cfg.t0 + cfg.hardlimit) break;
        int r = recvmmsg(fd, rmsg, RBATCH, MSG_WAITFORONE, NULL);
        if (r < 0 && errno != EAGAIN && errno != EINTR) w->errors[err_kind(errno)]++;
        if (r > 0) t = now();
        for (int j = 0; j < r; j++) {
            char *b = riov[j].iov_base;
            uint32_t seq;
            uint16_t idx;
            memcpy(&seq, b, sizeof seq);
            memcpy(&idx, b + 4, sizeof idx);
            if (rmsg[j].msg_len != (unsigned)cfg.size || idx >= n) {
                w->errors[E_MISMATCH]++;
                continue;
            }
            struct slot *s = &w->slots[idx];
            if (s->state != WAITING || seq != s->seq) {
                w->errors[E_STALE]++;
                continue;
            }
            w->received++;
            record(w, s->started, t);
            s->state = IDLE;
        }
        if (t - last_scan > 0.002) {
            last_scan = t;
            for (int i = 0; i < n; i++) {
                struct slot *s = &w->slots[i];
                if (s->state == WAITING && t > s->deadline) {
                    w->errors[E_TIMEOUT]++;  /* a lost datagram: send the next one */
                    s->state = IDLE;
                }
            }
        }
    }
    close(fd);
    free(sbuf); free(rbuf); free(smsg); free(siov); free(which);
}

/* ---- the loop --------------------------------------------------------------------------- */

static void *work(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < w->nslots; i++) {
        w->slots[i].fd = -1;
        w->slots[i].state = IDLE;
        w->slots[i].src = (w->id * 7 + i) % cfg.nsrc;
    }
    if (cfg.udp) {
        udp_loop(w);
        return NULL;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[256];
    double last_scan = 0;
    for (;;) {
        int run = running();
        int busy = 0;
        for (int i = 0; i < w->nslots; i++) {
            struct slot *s = &w->slots[i];
            if (s->state == IDLE && run) tcp_start(w, ep, s);
            if (s->state != IDLE) busy++;
        }
        if (!busy && !run) break;
        double t = now();
        if (!run && t > cfg.t_end + 5.0) break;  /* drain, bounded */
        if (t > cfg.t0 + cfg.hardlimit) break;
        int n = epoll_wait(ep, evs, 256, 20);
        for (int i = 0; i < n; i++) {
            struct slot *s = evs[i].data.ptr;
            if (s->fd >= 0) tcp_event(w, ep, s, evs[i].events);
        }
        t = now();
        if (t - last_scan > 0.002) {
            last_scan = t;
            for (int i = 0; i < w->nslots; i++) {
                struct slot *s = &w->slots[i];
                if (s->state != IDLE && t > s->deadline) {
                    w->errors[E_TIMEOUT]++;
                    finish(w, ep, s);
                }
            }
        }
    }
    for (int i = 0; i < w->nslots; i++)
        if (w->slots[i].fd >= 0) {
            if (w->slots[i].state != IDLE) w->errors[E_TIMEOUT]++;  /* unfinished */
            close(w->slots[i].fd);
        }
    close(ep);
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(uint32_t *v, size_t n, double p) {
    if (!n) return 0;
    size_t i = (size_t)(p / 100.0 * (n - 1) + 0.5);
    return v[i];
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, opt;
    cfg.conc = 8; cfg.threads = 1; cfg.duration = 2; cfg.warmup = 0.3; cfg.hardlimit = 60;
    cfg.size = 64; cfg.nsrc = 8; cfg.timeout = -1;
    while ((opt = getopt(argc, argv, "h:p:uc:t:d:w:n:T:s:S:o:k")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'u': cfg.udp = 1; break;
        case 'c': cfg.conc = atoi(optarg); break;
        case 't': cfg.threads = atoi(optarg); break;
        case 'd': cfg.duration = atof(optarg); break;
        case 'w': cfg.warmup = atof(optarg); break;
        case 'n': cfg.count = atol(optarg); break;
        case 'T': cfg.hardlimit = atof(optarg); break;
        case 's': cfg.size = atoi(optarg); break;
        case 'S': cfg.nsrc = atoi(optarg); break;
        case 'o': cfg.timeout = atof(optarg) / 1000.0; break;
        case 'k': cfg.keep_open = 1; break;
        default: fprintf(stderr, "usage: see the comment at the top of client.c\n"); return 2;
        }
    }
    if (!port || cfg.conc < 1 || cfg.threads < 1 || cfg.size < 16 || cfg.size > 1400 ||
        cfg.nsrc < 1 || cfg.nsrc > 250) {
        fprintf(stderr, "client: bad arguments\n");
        return 2;
    }
    if (cfg.threads > cfg.conc) cfg.threads = cfg.conc;
    if (cfg.timeout < 0) cfg.timeout = cfg.udp ? 0.2 : 10.0;
    struct sockaddr_in *d4 = (struct sockaddr_in *)&cfg.dst;
    struct sockaddr_in6 *d6 = (struct sockaddr_in6 *)&cfg.dst;
    if (inet_pton(AF_INET, host, &d4->sin_addr) == 1) {
        d4->sin_family = AF_INET;
        d4->sin_port = htons(port);
        cfg.dstlen = sizeof *d4;
        if ((ntohl(d4->sin_addr.s_addr) >> 24) != 127) {
            fprintf(stderr, "client: loopback only\n");
            return 2;
        }
    } else if (inet_pton(AF_INET6, host, &d6->sin6_addr) == 1) {
        d6->sin6_family = AF_INET6;
        d6->sin6_port = htons(port);
        cfg.dstlen = sizeof *d6;
        cfg.v6 = 1;
        if (!IN6_IS_ADDR_LOOPBACK(&d6->sin6_addr)) {
            fprintf(stderr, "client: loopback only\n");
            return 2;
        }
    } else {
        fprintf(stderr, "client: bad host %s\n", host);
        return 2;
    }
    cfg.msg = malloc(cfg.size);
    for (int i = 0; i < cfg.size; i++) cfg.msg[i] = 'a' + i % 26;
    cfg.msg[cfg.size - 1] = '\n';

    cfg.t0 = now();
    if (cfg.count > 0) {
        cfg.warmup = 0;
        cfg.t_measure = cfg.t0;
        cfg.t_end = cfg.t0 + cfg.hardlimit;
    } else {
        cfg.t_measure = cfg.t0 + cfg.warmup;
        cfg.t_end = cfg.t_measure + cfg.duration;
        if (cfg.t_end > cfg.t0 + cfg.hardlimit) cfg.t_end = cfg.t0 + cfg.hardlimit;
    }
    struct worker *ws = calloc(cfg.threads, sizeof *ws);
    for (int i = 0; i < cfg.threads; i++) {
        ws[i].id = i;
        ws[i].nslots = cfg.conc / cfg.threads + (i < cfg.conc % cfg.threads);
        ws[i].slots = calloc(ws[i].nslots, sizeof(struct slot));
        pthread_create(&ws[i].thread, NULL, work, &ws[i]);
    }
    uint64_t measured = 0, total = 0, sent = 0, received = 0, errors[E_N] = {0};
    size_t nlat = 0;
    for (int i = 0; i < cfg.threads; i++) {
        pthread_join(ws[i].thread, NULL);
        measured += ws[i].measured; total += ws[i].done_total; nlat += ws[i].nlat;
        sent += ws[i].sent; received += ws[i].received;
        for (int k = 0; k < E_N; k++) errors[k] += ws[i].errors[k];
    }
    double t_done = now();
    uint32_t *lat = malloc((nlat ? nlat : 1) * sizeof *lat);
    size_t k = 0;
    double sum = 0;
    for (int i = 0; i < cfg.threads; i++)
        for (size_t j = 0; j < ws[i].nlat; j++) { lat[k++] = ws[i].lat[j]; sum += ws[i].lat[j]; }
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    double window;
    if (cfg.count > 0) {
        /* the -n run ends with the last completion counted: elapsed from the start */
        window = t_done - cfg.t0;
    } else {
        window = cfg.t_end - cfg.t_measure;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"mode\": \"%s\", \"port\": %d, \"concurrency\": %d, \"threads\": %d, "
           "\"window_s\": %.3f, \"completed\": %llu, \"completed_all\": %llu, \"rate\": %.1f, ",
           cfg.udp ? "udp" : "tcp", port, cfg.conc, cfg.threads, window,
           (unsigned long long)measured, (unsigned long long)total,
           window > 0 ? measured / window : 0.0);
    if (cfg.udp)
        printf("\"sent\": %llu, \"received\": %llu, ", (unsigned long long)sent,
               (unsigned long long)received);
    printf("\"latency_us\": {\"p50\": %.0f, \"p90\": %.0f, \"p99\": %.0f, \"max\": %.0f, "
           "\"mean\": %.1f}, ", pct(lat, nlat, 50), pct(lat, nlat, 90), pct(lat, nlat, 99),
           nlat ? (double)lat[nlat - 1] : 0.0, nlat ? sum / nlat : 0.0);
    printf("\"errors\": {");
    int first = 1;
    uint64_t nerr = 0;
    for (int i = 0; i < E_N; i++) {
        if (!errors[i]) continue;
        printf("%s\"%s\": %llu", first ? "" : ", ", ERR_NAMES[i], (unsigned long long)errors[i]);
        first = 0;
        nerr += errors[i];
    }
    printf("}, \"error_count\": %llu, ", (unsigned long long)nerr);
    printf("\"client_cpu_s\": %.3f, \"client_cpu_per_op_us\": %.2f, \"wall_s\": %.3f}\n", cpu,
           total ? cpu / total * 1e6 : 0.0, t_done - cfg.t0);
    return 0;
}
