/*
 * memcache: a small per-thread cache of freed blocks in front of malloc, for the HTTP/2 path's
 * short-lived objects (nghttp2's streams, frames and header copies, the codecs' per-stream
 * state and buffers).
 *
 * Why: an HTTP/2 connection with a hundred streams in flight allocates a burst of same-sized
 * objects per read and frees them a little later. glibc's per-thread cache keeps only seven
 * blocks of a size, so most of these went through its general path (~6k instructions per
 * proxied request per sidecar, 15-20 % of the L7 HTTP/2 path, plus heap trimming and the page
 * faults after it). Here a freed block of up to MEMCACHE_BLOCK_MAX bytes goes on its size
 * class's list and the next allocation of that class takes it back in a few instructions.
 *
 * Bounds: a thread keeps at most MEMCACHE_MAX_BYTES in its lists (a block freed past that goes
 * back to malloc), and memcache_trim() gives them all back (h2.c calls it when the thread's
 * last HTTP/2 session ends, so an idle worker holds nothing). Larger blocks pass straight
 * through to malloc. Under AddressSanitizer nothing is cached (every block is really freed, so
 * use-after-free is still caught).
 *
 * Each block carries a 16-byte header (its class), so memcache_free() needs no size (nghttp2's
 * allocator interface gives none). A block must be freed by memcache_free(), never free(), and
 * memory from malloc() never by memcache_free(). Any thread may free any block: the block joins
 * the freeing thread's lists. OOM aborts, like util.h's x*alloc().
 */
#ifndef CONNECTD_MEMCACHE_H
#define CONNECTD_MEMCACHE_H

#include <stddef.h>

#define MEMCACHE_BLOCK_MAX (4096u)        /* larger requests pass through to malloc */
#define MEMCACHE_MAX_BYTES (512u * 1024u) /* cached per thread, headers included */

/* <n> bytes (0 is allowed), 16-byte aligned. Never NULL. */
void *memcache_alloc(size_t n);
/* <nmemb> * <size> zeroed bytes (aborts on overflow). Never NULL. */
void *memcache_calloc(size_t nmemb, size_t size);
/* Resizes <p> (NULL: a new block) to <n> bytes, contents kept up to the smaller size. */
void *memcache_realloc(void *p, size_t n);
/* Gives <p> back (NULL is a no-op). */
void memcache_free(void *p);
/* Gives every block this thread caches back to malloc. */
void memcache_trim(void);
/* Bytes this thread caches now (tests). */
size_t memcache_cached_bytes(void);

#endif
