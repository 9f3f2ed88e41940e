// Typed function builders without generated code.
//
// `npx convex codegen` writes convex/_generated/server.ts with exactly these definitions, but it
// needs a deployment to run. Building them here from the schema keeps the repository type-checkable
// in CI (`npm run typecheck`) and deployable as is; the generated folder, when a deploy creates it,
// is simply unused.
import {
  type DataModelFromSchemaDefinition,
  type DocumentByName,
  type MutationBuilder,
  type QueryBuilder,
  type GenericMutationCtx,
  mutationGeneric,
  queryGeneric,
} from "convex/server";
import type schema from "./schema";

export type DataModel = DataModelFromSchemaDefinition<typeof schema>;
export type Doc = DocumentByName<DataModel, "videos">;
export type MutationCtx = GenericMutationCtx<DataModel>;
export const query = queryGeneric as QueryBuilder<DataModel, "public">;
export const mutation = mutationGeneric as MutationBuilder<DataModel, "public">;
