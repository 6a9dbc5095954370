/* PID 1 of the Linux 6.12 image tools/linux-side-by-side builds: loads /test_vmalloc.ko with
 * the parameters given after "--" on the kernel command line (the kernel hands them to init
 * as arguments), prints what finit_module returned (test_vmalloc fails its own load on
 * purpose, once its cases ran), and powers the machine off so QEMU exits. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char params[1024] = "";
    for (int i = 1; i < argc; i++) {
        strncat(params, argv[i], sizeof(params) - strlen(params) - 2);
        strcat(params, " ");
    }
    int fd = open("/test_vmalloc.ko", O_RDONLY);
    if (fd < 0)
        perror("init: open /test_vmalloc.ko");
    long r = syscall(SYS_finit_module, fd, params, 0);
    printf("init: test_vmalloc loaded with '%s': %ld\n", params, r);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
