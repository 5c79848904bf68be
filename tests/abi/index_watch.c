/*
 * index_watch.c -- does a peer ever see a ring index half-written?
 *
 *   index_watch PAGE A B SECONDS
 *
 * Spins reading the u32 at offset 0 of the mmapped page file (where req_prod
 * lives) for SECONDS while another process keeps storing A and B there, and
 * prints {"reads": N, "other_values": M, "first_other": V}.  M must be 0: a
 * torn or transient value would let a backend read requests that were never
 * pushed (or miss ones that were).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
    const volatile uint32_t *index;
    uint32_t a, b, v, first_other = 0;
    unsigned long long reads = 0, others = 0;
    struct timespec start, now;
    double seconds;
    int fd;

    if (argc != 5) { fputs("usage: index_watch PAGE A B SECONDS\n", stderr); return 2; }
    a = (uint32_t)strtoul(argv[2], NULL, 0);
    b = (uint32_t)strtoul(argv[3], NULL, 0);
    seconds = atof(argv[4]);
    fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror(argv[1]); return 2; }
    index = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
    if (index == MAP_FAILED) { perror("mmap"); return 2; }
    /* Tell the writer we are watching, then watch. */
    puts("ready");
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 100000; i++) {
            v = *index;
            reads++;
            if (v != a && v != b && others++ == 0)
                first_other = v;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    printf("{\"reads\": %llu, \"other_values\": %llu, \"first_other\": %u}\n", reads, others, first_other);
    return 0;
}
