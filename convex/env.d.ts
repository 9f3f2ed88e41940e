// Convex functions read deployment environment variables through `process.env`; this declares just
// that much, so type-checking needs no @types/node. (Files with two dots are not deployed.)
declare const process: { env: Record<string, string | undefined> };
