/* The tiny compiled handler: copy stdin to stdout until EOF, like cat, with nothing else.
 * The bench links it statically when it can, so an exec costs no dynamic loading. */
#include <errno.h>
#include <unistd.h>

int main(void) {
    char buf[16384];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(1, buf + off, n - off);
            if (w < 0) {
                if (errno == EINTR) continue;
                return 1;
            }
            off += w;
        }
    }
}
