/* The bench's syslog sink: a unix datagram socket that reads every record and drops it.
 *
 * superd's "logging on" runs point settings.syslog.address here, so the daemon pays the real
 * cost of formatting and sending its per-connection lines, as it would to rsyslogd, while
 * the reader itself costs next to nothing. On SIGTERM it prints how many records it got.
 *
 *   sink PATH
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: sink PATH\n"); return 2; }
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    unlink(argv[1]);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    struct sigaction sa = {.sa_handler = on_term};  /* no SA_RESTART: recv returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    unsigned long long records = 0, bytes = 0;
    char buf[8192];
    while (!stop) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n >= 0) { records++; bytes += n; }
        else if (errno != EINTR) break;
    }
    unlink(argv[1]);
    printf("{\"records\": %llu, \"bytes\": %llu}\n", records, bytes);
    return 0;
}
