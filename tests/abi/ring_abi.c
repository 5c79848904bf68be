/*
 * ring_abi.c -- xenbed's ring codecs checked against Xen's own headers.
 *
 * Built and driven by tests/unit/test_abi_conformance.py; needs Debian's
 * libxen-dev (/usr/include/xen).  Every mode prints one JSON object.
 *
 *   ring_abi layout
 *       sizeof/offsetof of every blkif/netif struct and field, the shared
 *       ring header offsets, __CONST_RING_SIZE for blkif, netif tx and rx at
 *       ring-page-order 0..3, and the protocol constants.
 *
 *   ring_abi init PAGE ORDER
 *       SHARED_RING_INIT on the page file (to compare with SharedRing.init).
 *
 *   ring_abi back KIND PAGE ORDER START
 *       Xen's back end on a ring the Python FrontRing filled: BACK_RING_ATTACH
 *       at index START, take every request with RING_COPY_REQUEST (refusing a
 *       req_prod past the ring with RING_REQUEST_PROD_OVERFLOW), print its
 *       fields, answer each by a fixed rule, RING_PUSH_RESPONSES_AND_CHECK_NOTIFY,
 *       then RING_FINAL_CHECK_FOR_REQUESTS.
 *
 *   ring_abi front KIND PAGE ORDER COUNT
 *       Xen's front end: FRONT_RING_ATTACH where the Python side left the
 *       ring, put COUNT requests of a fixed pattern, print them,
 *       RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
 *
 *   ring_abi front-responses KIND PAGE ORDER RSP_CONS
 *       Xen's front end collecting the responses a Python BackRing pushed:
 *       RING_COPY_RESPONSE until none are left, then
 *       RING_FINAL_CHECK_FOR_RESPONSES.
 *
 * KIND is blkif, netif_tx or netif_rx.  Exit status 3 means the peer's
 * producer index ran past the ring (the check the Python side must match).
 */

/* The latest interface: ring.h then leaves xen_mb() and friends to us. */
#define __XEN_TOOLS__ 1

#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>

#define xen_mb()  __sync_synchronize()
#define xen_rmb() __sync_synchronize()
#define xen_wmb() __sync_synchronize()

#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/protocols.h>

#define PAGE_BYTES 4096UL
#define EXIT_PEER_OVERFLOW 3

/* ------------------------------------------------------------------ */
/* JSON output: a tiny comma-aware printer.                            */

static int first_item = 1;
static void item_sep(void) { if (!first_item) fputs(", ", stdout); first_item = 0; }
static void open_obj(const char *key) { item_sep(); if (key) printf("\"%s\": ", key); fputs("{", stdout); first_item = 1; }
static void close_obj(void) { fputs("}", stdout); first_item = 0; }
static void open_list(const char *key) { item_sep(); printf("\"%s\": [", key); first_item = 1; }
static void close_list(void) { fputs("]", stdout); first_item = 0; }
static void num(const char *key, long long v) { item_sep(); printf("\"%s\": %lld", key, v); }
static void unum(const char *key, unsigned long long v) { item_sep(); printf("\"%s\": %llu", key, v); }
static void str(const char *key, const char *v) { item_sep(); printf("\"%s\": \"%s\"", key, v); }
static void boolean(const char *key, int v) { item_sep(); printf("\"%s\": %s", key, v ? "true" : "false"); }
static void list_unum(unsigned long long v) { item_sep(); printf("%llu", v); }

/* ------------------------------------------------------------------ */
/* layout                                                              */

#define SIZE(type) num(#type, (long long)sizeof(struct type))
#define FIELD(type, member) do {                                            \
        open_obj(#type "." #member);                                        \
        num("offset", (long long)offsetof(struct type, member));            \
        num("size", (long long)sizeof(((struct type *)0)->member));         \
        close_obj();                                                        \
    } while (0)
#define CONST(name) num(#name, (long long)(name))

static void print_layout(void)
{
    int order;

    open_obj(NULL);
    str("protocol", XEN_IO_PROTO_ABI_NATIVE);

    open_obj("sizes");
    SIZE(blkif_request_segment);
    SIZE(blkif_request);
    SIZE(blkif_request_discard);
    SIZE(blkif_request_indirect);
    SIZE(blkif_response);
    num("blkif_sring_entry", (long long)sizeof(union blkif_sring_entry));
    SIZE(netif_tx_request);
    SIZE(netif_tx_response);
    SIZE(netif_rx_request);
    SIZE(netif_rx_response);
    SIZE(netif_extra_info);
    num("netif_tx_sring_entry", (long long)sizeof(union netif_tx_sring_entry));
    num("netif_rx_sring_entry", (long long)sizeof(union netif_rx_sring_entry));
    close_obj();

    open_obj("fields");
    /* The shared header is the same for every ring type; blkif's stands for all. */
    FIELD(blkif_sring, req_prod);
    FIELD(blkif_sring, req_event);
    FIELD(blkif_sring, rsp_prod);
    FIELD(blkif_sring, rsp_event);
    FIELD(blkif_sring, pvt);
    FIELD(blkif_sring, __pad);
    FIELD(blkif_sring, ring);
    FIELD(netif_tx_sring, ring);
    FIELD(netif_rx_sring, ring);

    FIELD(blkif_request_segment, gref);
    FIELD(blkif_request_segment, first_sect);
    FIELD(blkif_request_segment, last_sect);
    FIELD(blkif_request, operation);
    FIELD(blkif_request, nr_segments);
    FIELD(blkif_request, handle);
    FIELD(blkif_request, id);
    FIELD(blkif_request, sector_number);
    FIELD(blkif_request, seg);
    FIELD(blkif_request_discard, operation);
    FIELD(blkif_request_discard, flag);
    FIELD(blkif_request_discard, handle);
    FIELD(blkif_request_discard, id);
    FIELD(blkif_request_discard, sector_number);
    FIELD(blkif_request_discard, nr_sectors);
    FIELD(blkif_request_indirect, operation);
    FIELD(blkif_request_indirect, indirect_op);
    FIELD(blkif_request_indirect, nr_segments);
    FIELD(blkif_request_indirect, id);
    FIELD(blkif_request_indirect, sector_number);
    FIELD(blkif_request_indirect, handle);
    FIELD(blkif_request_indirect, indirect_grefs);
    FIELD(blkif_response, id);
    FIELD(blkif_response, operation);
    FIELD(blkif_response, status);

    FIELD(netif_tx_request, gref);
    FIELD(netif_tx_request, offset);
    FIELD(netif_tx_request, flags);
    FIELD(netif_tx_request, id);
    FIELD(netif_tx_request, size);
    FIELD(netif_tx_response, id);
    FIELD(netif_tx_response, status);
    FIELD(netif_rx_request, id);
    FIELD(netif_rx_request, pad);
    FIELD(netif_rx_request, gref);
    FIELD(netif_rx_response, id);
    FIELD(netif_rx_response, offset);
    FIELD(netif_rx_response, flags);
    FIELD(netif_rx_response, status);
    FIELD(netif_extra_info, type);
    FIELD(netif_extra_info, flags);
    FIELD(netif_extra_info, u);
    FIELD(netif_extra_info, u.gso.size);
    FIELD(netif_extra_info, u.gso.type);
    FIELD(netif_extra_info, u.gso.features);
    FIELD(netif_extra_info, u.mcast.addr);
    FIELD(netif_extra_info, u.hash.type);
    FIELD(netif_extra_info, u.hash.algorithm);
    FIELD(netif_extra_info, u.hash.value);
    close_obj();

    open_obj("ring_sizes");
    open_list("blkif");
    for (order = 0; order <= 3; order++)
        list_unum(__CONST_RING_SIZE(blkif, PAGE_BYTES << order));
    close_list();
    open_list("netif_tx");
    for (order = 0; order <= 3; order++)
        list_unum(__CONST_RING_SIZE(netif_tx, PAGE_BYTES << order));
    close_list();
    open_list("netif_rx");
    for (order = 0; order <= 3; order++)
        list_unum(__CONST_RING_SIZE(netif_rx, PAGE_BYTES << order));
    close_list();
    close_obj();

    open_obj("constants");
    CONST(BLKIF_OP_READ); CONST(BLKIF_OP_WRITE); CONST(BLKIF_OP_WRITE_BARRIER);
    CONST(BLKIF_OP_FLUSH_DISKCACHE); CONST(BLKIF_OP_RESERVED_1); CONST(BLKIF_OP_DISCARD);
    CONST(BLKIF_OP_INDIRECT);
    CONST(BLKIF_RSP_EOPNOTSUPP); CONST(BLKIF_RSP_ERROR); CONST(BLKIF_RSP_OKAY);
    CONST(BLKIF_DISCARD_SECURE);
    CONST(BLKIF_MAX_SEGMENTS_PER_REQUEST); CONST(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    CONST(VDISK_CDROM); CONST(VDISK_REMOVABLE); CONST(VDISK_READONLY);
    CONST(XEN_NETIF_NR_SLOTS_MIN); CONST(XEN_NETIF_MAX_TX_SIZE);
    CONST(NETTXF_csum_blank); CONST(NETTXF_data_validated); CONST(NETTXF_more_data);
    CONST(NETTXF_extra_info);
    CONST(NETRXF_data_validated); CONST(NETRXF_csum_blank); CONST(NETRXF_more_data);
    CONST(NETRXF_extra_info); CONST(NETRXF_gso_prefix);
    CONST(XEN_NETIF_EXTRA_TYPE_NONE); CONST(XEN_NETIF_EXTRA_TYPE_GSO);
    CONST(XEN_NETIF_EXTRA_TYPE_MCAST_ADD); CONST(XEN_NETIF_EXTRA_TYPE_MCAST_DEL);
    CONST(XEN_NETIF_EXTRA_TYPE_HASH); CONST(XEN_NETIF_EXTRA_TYPE_MAX);
    CONST(XEN_NETIF_EXTRA_FLAG_MORE);
    CONST(XEN_NETIF_GSO_TYPE_NONE); CONST(XEN_NETIF_GSO_TYPE_TCPV4); CONST(XEN_NETIF_GSO_TYPE_TCPV6);
    CONST(NETIF_RSP_DROPPED); CONST(NETIF_RSP_ERROR); CONST(NETIF_RSP_OKAY); CONST(NETIF_RSP_NULL);
    close_obj();

    close_obj();
    putchar('\n');
}

/* ------------------------------------------------------------------ */
/* page files                                                          */

static void *map_page_file(const char *path, int order)
{
    size_t bytes = PAGE_BYTES << order;
    int fd = open(path, O_RDWR);
    void *page;

    if (fd < 0) { perror(path); exit(2); }
    page = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (page == MAP_FAILED) { perror("mmap"); exit(2); }
    close(fd);
    return page;
}

/* ------------------------------------------------------------------ */
/* message printers (field names as in the headers)                    */

static void print_segment(const struct blkif_request_segment *s)
{
    open_obj(NULL);
    unum("gref", s->gref);
    unum("first_sect", s->first_sect);
    unum("last_sect", s->last_sect);
    close_obj();
}

/* A blkif slot, from a private copy, interpreted by its operation byte. */
static void print_blkif_request(const struct blkif_request *copy)
{
    unsigned int i;

    open_obj(NULL);
    unum("operation", copy->operation);
    if (copy->operation == BLKIF_OP_DISCARD) {
        struct blkif_request_discard d;
        memcpy(&d, copy, sizeof d);
        unum("flag", d.flag);
        unum("handle", d.handle);
        unum("id", d.id);
        unum("sector_number", d.sector_number);
        unum("nr_sectors", d.nr_sectors);
    } else if (copy->operation == BLKIF_OP_INDIRECT) {
        struct blkif_request_indirect in;
        memcpy(&in, copy, sizeof in);
        unum("indirect_op", in.indirect_op);
        unum("nr_segments", in.nr_segments);
        unum("handle", in.handle);
        unum("id", in.id);
        unum("sector_number", in.sector_number);
        open_list("indirect_grefs");
        for (i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            list_unum(in.indirect_grefs[i]);
        close_list();
    } else {
        unum("nr_segments", copy->nr_segments);
        unum("handle", copy->handle);
        unum("id", copy->id);
        unum("sector_number", copy->sector_number);
        open_list("seg");
        for (i = 0; i < copy->nr_segments && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
            print_segment(&copy->seg[i]);
        close_list();
    }
    close_obj();
}

static void print_tx_request(const struct netif_tx_request *r)
{
    open_obj(NULL);
    str("kind", "netif_tx_request");
    unum("gref", r->gref); unum("offset", r->offset); unum("flags", r->flags);
    unum("id", r->id); unum("size", r->size);
    close_obj();
}

static void print_extra_info(const struct netif_extra_info *x)
{
    unsigned int i;

    open_obj(NULL);
    str("kind", "netif_extra_info");
    unum("type", x->type);
    unum("flags", x->flags);
    open_list("u");
    for (i = 0; i < sizeof x->u; i++)
        list_unum(((const uint8_t *)&x->u)[i]);
    close_list();
    if (x->type == XEN_NETIF_EXTRA_TYPE_GSO) {
        unum("gso_size", x->u.gso.size);
        unum("gso_type", x->u.gso.type);
        unum("gso_features", x->u.gso.features);
    }
    close_obj();
}

/* ------------------------------------------------------------------ */
/* back end: BACK_RING_ATTACH on a ring the Python front filled         */

/* The status the C back end answers a blkif request with; the Python
 * test applies the same rule to check the responses it reads back. */
static int16_t blkif_status_for(uint8_t operation)
{
    switch (operation) {
    case BLKIF_OP_READ: case BLKIF_OP_WRITE: case BLKIF_OP_DISCARD: case BLKIF_OP_INDIRECT:
        return BLKIF_RSP_OKAY;
    case BLKIF_OP_WRITE_BARRIER: case BLKIF_OP_FLUSH_DISKCACHE:
        return BLKIF_RSP_EOPNOTSUPP;
    default:
        return BLKIF_RSP_ERROR;
    }
}

/* Shared by the three ring types: the overflow check and the final report. */
#define CHECK_REQUEST_PROD(ring) do {                                       \
        RING_IDX prod_ = (ring).sring->req_prod;                            \
        if (RING_REQUEST_PROD_OVERFLOW(&(ring), prod_)) {                   \
            open_obj(NULL);                                                 \
            str("error", "RING_REQUEST_PROD_OVERFLOW");                     \
            unum("req_prod", prod_);                                        \
            unum("rsp_prod_pvt", (ring).rsp_prod_pvt);                      \
            close_obj(); putchar('\n');                                     \
            exit(EXIT_PEER_OVERFLOW);                                       \
        }                                                                   \
        xen_rmb(); /* read req_prod before the requests it announces */     \
    } while (0)

#define PUSH_AND_REPORT(ring) do {                                          \
        int notify_, more_;                                                 \
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&(ring), notify_);             \
        RING_FINAL_CHECK_FOR_REQUESTS(&(ring), more_);                      \
        boolean("notify", notify_);                                         \
        boolean("more_requests", more_);                                    \
        unum("req_cons", (ring).req_cons);                                  \
        unum("rsp_prod", (ring).sring->rsp_prod);                           \
        unum("req_event", (ring).sring->req_event);                         \
        unum("ring_size", RING_SIZE(&(ring)));                              \
    } while (0)

static void back_blkif(void *page, int order, RING_IDX start)
{
    blkif_back_ring_t ring;
    struct blkif_request copy;
    struct blkif_response *rsp;

    BACK_RING_ATTACH(&ring, (blkif_sring_t *)page, start, PAGE_BYTES << order);
    CHECK_REQUEST_PROD(ring);
    open_obj(NULL);
    open_list("requests");
    while (RING_HAS_UNCONSUMED_REQUESTS(&ring)) {
        /* Copy first: the front may rewrite the slot while we look at it. */
        RING_COPY_REQUEST(&ring, ring.req_cons, &copy);
        ring.req_cons++;
        print_blkif_request(&copy);
        rsp = RING_GET_RESPONSE(&ring, ring.rsp_prod_pvt);
        rsp->id = copy.id; /* id is at offset 8 in every request kind */
        rsp->operation = copy.operation;
        rsp->status = blkif_status_for(copy.operation);
        ring.rsp_prod_pvt++;
    }
    close_list();
    PUSH_AND_REPORT(ring);
    close_obj();
    putchar('\n');
}

static void back_netif_tx(void *page, int order, RING_IDX start)
{
    netif_tx_back_ring_t ring;
    struct netif_tx_request req;
    struct netif_extra_info extra;
    struct netif_tx_response *rsp;
    int extras_follow = 0;

    BACK_RING_ATTACH(&ring, (netif_tx_sring_t *)page, start, PAGE_BYTES << order);
    CHECK_REQUEST_PROD(ring);
    open_obj(NULL);
    open_list("requests");
    while (RING_HAS_UNCONSUMED_REQUESTS(&ring)) {
        rsp = RING_GET_RESPONSE(&ring, ring.rsp_prod_pvt);
        if (extras_follow) {
            /* An extra-info slot: netback answers it NETIF_RSP_NULL. */
            memcpy(&extra, (const void *)RING_GET_REQUEST(&ring, ring.req_cons), sizeof extra);
            ring.req_cons++;
            print_extra_info(&extra);
            extras_follow = extra.flags & XEN_NETIF_EXTRA_FLAG_MORE;
            rsp->id = 0;
            rsp->status = NETIF_RSP_NULL;
        } else {
            RING_COPY_REQUEST(&ring, ring.req_cons, &req);
            ring.req_cons++;
            print_tx_request(&req);
            extras_follow = req.flags & NETTXF_extra_info;
            rsp->id = req.id;
            rsp->status = NETIF_RSP_OKAY;
        }
        ring.rsp_prod_pvt++;
    }
    close_list();
    PUSH_AND_REPORT(ring);
    close_obj();
    putchar('\n');
}

static void back_netif_rx(void *page, int order, RING_IDX start)
{
    netif_rx_back_ring_t ring;
    struct netif_rx_request req;
    struct netif_rx_response *rsp;
    struct netif_extra_info gso;
    unsigned int k = 0;

    BACK_RING_ATTACH(&ring, (netif_rx_sring_t *)page, start, PAGE_BYTES << order);
    CHECK_REQUEST_PROD(ring);
    open_obj(NULL);
    open_list("requests");
    /* Fill buffer k with (60 + k) bytes.  The first packet carries a GSO
     * extra info, which uses the next request's slot for its response. */
    while (RING_HAS_UNCONSUMED_REQUESTS(&ring)) {
        RING_COPY_REQUEST(&ring, ring.req_cons, &req);
        ring.req_cons++;
        open_obj(NULL);
        unum("id", req.id); unum("gref", req.gref);
        close_obj();
        if (k == 1) {
            memset(&gso, 0, sizeof gso);
            gso.type = XEN_NETIF_EXTRA_TYPE_GSO;
            gso.u.gso.size = 1448;
            gso.u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
            memcpy((void *)RING_GET_RESPONSE(&ring, ring.rsp_prod_pvt), &gso, sizeof gso);
        } else {
            rsp = RING_GET_RESPONSE(&ring, ring.rsp_prod_pvt);
            rsp->id = req.id;
            rsp->offset = 0;
            rsp->flags = NETRXF_data_validated | (k == 0 ? NETRXF_extra_info : 0);
            rsp->status = (int16_t)(60 + k);
        }
        ring.rsp_prod_pvt++;
        k++;
    }
    close_list();
    PUSH_AND_REPORT(ring);
    close_obj();
    putchar('\n');
}

/* ------------------------------------------------------------------ */
/* front end: FRONT_RING_ATTACH where the Python side left the ring    */

#define ATTACH_FRONT_AT_SHARED_INDEXES(ring, type, page, order) do {        \
        type *s_ = (type *)(page);                                          \
        FRONT_RING_ATTACH(&(ring), s_, s_->rsp_prod, PAGE_BYTES << (order));\
        (ring).req_prod_pvt = s_->req_prod;                                 \
    } while (0)

/* Request i of the C front's fixed pattern: reads, discards and indirect
 * writes in turn, with values that fill every field's width. */
static void put_blkif_request(blkif_front_ring_t *ring, unsigned int i)
{
    void *slot = RING_GET_REQUEST(ring, ring->req_prod_pvt);
    unsigned int j;

    if (i % 3 == 0) {
        struct blkif_request r;
        memset(&r, 0, sizeof r);
        r.operation = BLKIF_OP_READ;
        r.nr_segments = 1 + i % BLKIF_MAX_SEGMENTS_PER_REQUEST;
        r.handle = 51712 + i; /* xvda = 202:0 */
        r.id = 0xF00D000000000000ULL | i;
        r.sector_number = 0x123456789ULL + 8 * i;
        for (j = 0; j < r.nr_segments; j++) {
            r.seg[j].gref = 0x80000000U + 1000 * i + j;
            r.seg[j].first_sect = j % 8;
            r.seg[j].last_sect = 7;
        }
        memcpy(slot, &r, sizeof r);
    } else if (i % 3 == 1) {
        struct blkif_request_discard d;
        memset(&d, 0, sizeof d);
        d.operation = BLKIF_OP_DISCARD;
        d.flag = (i % 2) ? BLKIF_DISCARD_SECURE : 0;
        d.handle = 51712 + i;
        d.id = 0xD15C000000000000ULL | i;
        d.sector_number = 0xFFFFFFFF00000000ULL + i;
        d.nr_sectors = (1ULL << 33) + i;
        memcpy(slot, &d, sizeof d);
    } else {
        struct blkif_request_indirect in;
        memset(&in, 0, sizeof in);
        in.operation = BLKIF_OP_INDIRECT;
        in.indirect_op = BLKIF_OP_WRITE;
        in.nr_segments = 600 + i; /* two indirect pages */
        in.handle = 51712 + i;
        in.id = 0x1D1E000000000000ULL | i;
        in.sector_number = 4096ULL * i;
        in.indirect_grefs[0] = 7000 + 8 * i;
        in.indirect_grefs[1] = 7001 + 8 * i;
        memcpy(slot, &in, sizeof in);
    }
    ring->req_prod_pvt++;
}

static void front_blkif(void *page, int order, unsigned int count)
{
    blkif_front_ring_t ring;
    struct blkif_request copy;
    unsigned int i;
    int notify;

    ATTACH_FRONT_AT_SHARED_INDEXES(ring, blkif_sring_t, page, order);
    open_obj(NULL);
    open_list("requests");
    for (i = 0; i < count && !RING_FULL(&ring); i++) {
        put_blkif_request(&ring, i);
        RING_COPY_REQUEST(&ring, ring.req_prod_pvt - 1, &copy);
        print_blkif_request(&copy);
    }
    close_list();
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&ring, notify);
    boolean("notify", notify);
    unum("req_prod", ring.sring->req_prod);
    close_obj();
    putchar('\n');
}

static void front_netif_tx(void *page, int order, unsigned int count)
{
    netif_tx_front_ring_t ring;
    unsigned int i;
    int notify;

    ATTACH_FRONT_AT_SHARED_INDEXES(ring, netif_tx_sring_t, page, order);
    open_obj(NULL);
    open_list("requests");
    /* A first packet of two fragments with a GSO extra info between the
     * first request and the second, then single-fragment packets. */
    for (i = 0; i < count && !RING_FULL(&ring); i++) {
        if (i == 1) {
            struct netif_extra_info *x = (struct netif_extra_info *)RING_GET_REQUEST(&ring, ring.req_prod_pvt);
            memset(x, 0, sizeof *x);
            x->type = XEN_NETIF_EXTRA_TYPE_GSO;
            x->u.gso.size = 1448;
            x->u.gso.type = XEN_NETIF_GSO_TYPE_TCPV6;
            print_extra_info(x);
        } else {
            struct netif_tx_request *r = RING_GET_REQUEST(&ring, ring.req_prod_pvt);
            r->gref = 0x10000 + i;
            r->offset = (uint16_t)((i * 66) % 4096);
            r->flags = (i == 0) ? (NETTXF_extra_info | NETTXF_more_data | NETTXF_csum_blank)
                                : NETTXF_data_validated;
            r->id = (uint16_t)(i + 0x100);
            r->size = (i == 0) ? 3000 : (uint16_t)(60 + i);
            print_tx_request(r);
        }
        ring.req_prod_pvt++;
    }
    close_list();
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&ring, notify);
    boolean("notify", notify);
    unum("req_prod", ring.sring->req_prod);
    close_obj();
    putchar('\n');
}

static void front_netif_rx(void *page, int order, unsigned int count)
{
    netif_rx_front_ring_t ring;
    struct netif_rx_request *r;
    unsigned int i;
    int notify;

    ATTACH_FRONT_AT_SHARED_INDEXES(ring, netif_rx_sring_t, page, order);
    open_obj(NULL);
    open_list("requests");
    for (i = 0; i < count && !RING_FULL(&ring); i++) {
        r = RING_GET_REQUEST(&ring, ring.req_prod_pvt);
        r->id = (uint16_t)i;
        r->pad = 0;
        r->gref = 0x20000 + i;
        ring.req_prod_pvt++;
        open_obj(NULL);
        unum("id", r->id); unum("gref", r->gref);
        close_obj();
    }
    close_list();
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&ring, notify);
    boolean("notify", notify);
    unum("req_prod", ring.sring->req_prod);
    close_obj();
    putchar('\n');
}

/* ------------------------------------------------------------------ */
/* front end collecting responses                                      */

#define COLLECT_RESPONSES(ring, type, page, order, start, print_one) do {   \
        int more_;                                                          \
        RING_IDX prod_;                                                     \
        FRONT_RING_ATTACH(&(ring), (type *)(page), (start), PAGE_BYTES << (order)); \
        (ring).req_prod_pvt = (ring).sring->req_prod;                       \
        prod_ = (ring).sring->rsp_prod;                                     \
        if (RING_RESPONSE_PROD_OVERFLOW(&(ring), prod_)) {                  \
            open_obj(NULL); str("error", "RING_RESPONSE_PROD_OVERFLOW");    \
            close_obj(); putchar('\n');                                     \
            exit(EXIT_PEER_OVERFLOW);                                       \
        }                                                                   \
        xen_rmb(); /* read rsp_prod before the responses it announces */    \
        open_obj(NULL);                                                     \
        open_list("responses");                                             \
        while ((ring).rsp_cons != prod_) {                                  \
            print_one(&(ring));                                             \
            (ring).rsp_cons++;                                              \
        }                                                                   \
        close_list();                                                       \
        RING_FINAL_CHECK_FOR_RESPONSES(&(ring), more_);                     \
        boolean("more_responses", more_);                                   \
        unum("rsp_cons", (ring).rsp_cons);                                  \
        unum("rsp_event", (ring).sring->rsp_event);                         \
        close_obj();                                                        \
        putchar('\n');                                                      \
    } while (0)

static void print_blkif_response(blkif_front_ring_t *ring)
{
    struct blkif_response r;
    RING_COPY_RESPONSE(ring, ring->rsp_cons, &r);
    open_obj(NULL);
    unum("id", r.id); unum("operation", r.operation); num("status", r.status);
    close_obj();
}

static void print_tx_response(netif_tx_front_ring_t *ring)
{
    struct netif_tx_response r;
    RING_COPY_RESPONSE(ring, ring->rsp_cons, &r);
    open_obj(NULL);
    unum("id", r.id); num("status", r.status);
    close_obj();
}

static void print_rx_response(netif_rx_front_ring_t *ring)
{
    struct netif_rx_response r;
    RING_COPY_RESPONSE(ring, ring->rsp_cons, &r);
    open_obj(NULL);
    unum("id", r.id); unum("offset", r.offset); unum("flags", r.flags); num("status", r.status);
    close_obj();
}

/* ------------------------------------------------------------------ */

static void usage(void)
{
    fputs("usage: ring_abi layout\n"
          "       ring_abi init PAGE ORDER\n"
          "       ring_abi back KIND PAGE ORDER START\n"
          "       ring_abi front KIND PAGE ORDER COUNT\n"
          "       ring_abi front-responses KIND PAGE ORDER RSP_CONS\n"
          "KIND: blkif | netif_tx | netif_rx\n", stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    const char *mode, *kind;
    void *page;
    int order;
    unsigned long arg;

    if (argc < 2) usage();
    mode = argv[1];
    if (!strcmp(mode, "layout")) {
        print_layout();
        return 0;
    }
    if (!strcmp(mode, "init")) {
        if (argc != 4) usage();
        page = map_page_file(argv[2], atoi(argv[3]));
        SHARED_RING_INIT((blkif_sring_t *)page);
        return 0;
    }
    if (argc != 6) usage();
    kind = argv[2];
    order = atoi(argv[4]);
    arg = strtoul(argv[5], NULL, 0);
    page = map_page_file(argv[3], order);

#define DISPATCH(k, fn_blk, fn_tx, fn_rx) \
    if (!strcmp(k, "blkif")) fn_blk; else if (!strcmp(k, "netif_tx")) fn_tx; \
    else if (!strcmp(k, "netif_rx")) fn_rx; else usage()

    if (!strcmp(mode, "back")) {
        DISPATCH(kind, back_blkif(page, order, (RING_IDX)arg),
                 back_netif_tx(page, order, (RING_IDX)arg),
                 back_netif_rx(page, order, (RING_IDX)arg));
    } else if (!strcmp(mode, "front")) {
        DISPATCH(kind, front_blkif(page, order, (unsigned int)arg),
                 front_netif_tx(page, order, (unsigned int)arg),
                 front_netif_rx(page, order, (unsigned int)arg));
    } else if (!strcmp(mode, "front-responses")) {
        blkif_front_ring_t blk;
        netif_tx_front_ring_t tx;
        netif_rx_front_ring_t rx;
        DISPATCH(kind,
                 COLLECT_RESPONSES(blk, blkif_sring_t, page, order, (RING_IDX)arg, print_blkif_response),
                 COLLECT_RESPONSES(tx, netif_tx_sring_t, page, order, (RING_IDX)arg, print_tx_response),
                 COLLECT_RESPONSES(rx, netif_rx_sring_t, page, order, (RING_IDX)arg, print_rx_response));
    } else {
        usage();
    }
    return 0;
}
