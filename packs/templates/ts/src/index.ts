export { {{CONST}}_MANIFEST } from './manifest';
export { runJob } from './emit';
export { onRecoveryRequested } from './handlers/recovery-requested';
