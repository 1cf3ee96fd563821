// The CUDA emulator's fiber context switch (declared in cuda_emu.h).
//
// A block's threads are fibers; an emulated kernel switches between them at
// every barrier and every warp-collective operation (ldmatrix, mma), i.e.
// 32 switches per lane per tensor-core instruction. ucontext's swapcontext
// makes a system call per switch (it saves the signal mask: ~0.8 us here),
// so on x86-64 the switch is a few instructions of assembly that save the
// callee-saved registers, the SSE control word and the x87 control word
// (everything the SysV ABI requires a callee to preserve) and swap stacks.
// Other machines fall back to ucontext.
#include "emulation/cuda_emu.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)

extern "C" void rk_emu_switch_stack(void** save_sp, void* load_sp);
extern "C" void rk_emu_fiber_trampoline();

// rk_emu_switch_stack(save_sp, load_sp): pushes the callee-saved state on
// the current stack, stores the stack pointer in *save_sp, loads load_sp and
// pops the state saved there (by an earlier switch, or laid out by
// context_start for a fresh fiber).
asm(R"(
  .text
  .p2align 4
  .globl rk_emu_switch_stack
  .hidden rk_emu_switch_stack
  .type rk_emu_switch_stack, @function
rk_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rk_emu_switch_stack, .-rk_emu_switch_stack

  .p2align 4
  .globl rk_emu_fiber_trampoline
  .hidden rk_emu_fiber_trampoline
  .type rk_emu_fiber_trampoline, @function
rk_emu_fiber_trampoline:
  callq *%r13
  ud2
  .size rk_emu_fiber_trampoline, .-rk_emu_fiber_trampoline
)");

namespace rk_emu {

void context_start(FiberContext& c, char* stack, size_t size, void (*entry)()) {
  // Top of the stack, 16-byte aligned. The first switch to the fiber pops
  // the control words and six registers and returns into the trampoline
  // with rsp 16-byte aligned, which then calls entry (kept in r13): the ABI's
  // alignment at a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 24);
  sp[0] = reinterpret_cast<uint64_t>(&rk_emu_fiber_trampoline);  // return address
  sp[-1] = 0;                                                   // rbp
  sp[-2] = 0;                                                   // rbx
  sp[-3] = 0;                                                   // r12
  sp[-4] = reinterpret_cast<uint64_t>(entry);                   // r13
  sp[-5] = 0;                                                   // r14
  sp[-6] = 0;                                                   // r15
  const uint32_t mxcsr = 0x1F80;                                // default SSE control/status
  const uint16_t fpucw = 0x037F;                                // default x87 control word
  std::memcpy(reinterpret_cast<char*>(&sp[-7]), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(&sp[-7]) + 4, &fpucw, 2);
  c.sp = &sp[-7];
}

void context_switch(FiberContext& from, FiberContext& to) { rk_emu_switch_stack(&from.sp, to.sp); }

}  // namespace rk_emu

#else  // ucontext

namespace rk_emu {

void context_start(FiberContext& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;  // entry never returns: it switches back itself
  makecontext(&c.uc, entry, 0);
}

void context_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace rk_emu

#endif
